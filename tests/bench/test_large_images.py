"""bench/large_images.py: its summary's percentiles by hand, and the large image it sends."""

from __future__ import annotations

import base64
import io

from PIL import Image

from bench.large_images import large_image, summary


def test_summary_gives_median_95th_percentile_and_maximum():
    times = [float(t) for t in range(1, 101)]  # 1 .. 100 ms
    assert summary(times) == "n 100, p50 50.5 ms, p95 96.0 ms, max 100.0 ms"
    assert summary([7.0]) == "n 1, p50 7.0 ms, p95 7.0 ms, max 7.0 ms"


def test_the_large_image_is_a_jpeg_of_the_asked_size():
    url = large_image(side=256)
    header, _, payload = url.partition(",")
    assert header == "data:image/jpeg;base64"
    image = Image.open(io.BytesIO(base64.b64decode(payload)))
    assert (image.format, image.size, image.mode) == ("JPEG", (256, 256), "RGB")

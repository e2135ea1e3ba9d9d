"""TF32 matmuls on NVIDIA GPUs for a run, as the AdaLLaVA release trains (``--tf32 True``).

HF's ``tf32=True`` sets torch's two TF32 switches for the whole process; this callback sets them when the
run is set up and puts back what they were when it ends. Under ``bf16-mixed`` it reaches only the float32
matmuls (autocast runs the rest in bf16); on the CPU it changes nothing.
"""

from __future__ import annotations

import lightning as L
import torch


class TF32Matmuls(L.Callback):
    """Float32 matmuls and convolutions in TF32 (10-bit mantissa, float32 range) while the run lasts."""

    def __init__(self) -> None:
        self._saved: tuple[bool, bool] | None = None

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if self._saved is None:
            self._saved = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if self._saved is not None:
            torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = self._saved
            self._saved = None

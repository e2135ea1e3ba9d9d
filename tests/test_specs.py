"""Constructor specs: {class_path, init_args} of an object, and back."""

from __future__ import annotations

import pytest

from adaptive_mllm.schedulers import HeadScheduler, LayerScheduler, Scheduler
from adaptive_mllm.specs import instantiate, spec_of


class _Renamed:
    def __init__(self, width: int) -> None:
        self.size = width  # kept under another name: cannot be read back


def test_a_spec_builds_an_equal_object_again():
    spec = spec_of(HeadScheduler(3, rank=4, tau=1.5, budget_rule="release"))
    assert spec == {
        "class_path": "adaptive_mllm.schedulers.head.HeadScheduler",
        "init_args": {"num_prefix_layers": 3, "rank": 4, "tau": 1.5, "budget_rule": "release", "release_checkpoint": None},
    }
    again = instantiate(spec)
    assert type(again) is HeadScheduler and spec_of(again) == spec


def test_an_argument_that_cannot_be_read_back_is_named():
    with pytest.raises(ValueError, match="_Renamed's constructor argument 'width'"):
        spec_of(_Renamed(3))


def test_scheduler_from_spec_names_a_record_it_cannot_build():
    assert isinstance(Scheduler.from_spec(LayerScheduler(2).spec()), LayerScheduler)
    with pytest.raises(ValueError, match="NoSuchScheduler.* cannot be built here"):
        Scheduler.from_spec({"class_path": "adaptive_mllm.schedulers.NoSuchScheduler"})
    with pytest.raises(ValueError, match="records a OrderedDict, not a Scheduler"):
        Scheduler.from_spec({"class_path": "collections.OrderedDict"})

from adaptive_mllm.schedulers.base import Scheduler
from adaptive_mllm.schedulers.baselines import (
    BaselineScheduler,
    FullScheduler,
    RandomScheduler,
    StaticScheduler,
)
from adaptive_mllm.schedulers.head import HeadScheduler
from adaptive_mllm.schedulers.latency import LatencyEncoder
from adaptive_mllm.schedulers.layer import LayerScheduler
from adaptive_mllm.schedulers.plan import ExecutionPlan

__all__ = [
    "BaselineScheduler",
    "ExecutionPlan",
    "FullScheduler",
    "HeadScheduler",
    "LatencyEncoder",
    "LayerScheduler",
    "RandomScheduler",
    "Scheduler",
    "StaticScheduler",
]

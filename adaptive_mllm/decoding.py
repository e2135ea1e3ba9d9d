"""How decode steps run after the prefill: the one switch ``decode`` (recipe ``model.decode``, benchmark
``--decode``) and the captured per-layer steps.

- ``eager``: today's plan-aware cache, grown by concatenation each step (the reference);
- ``static``: a pre-allocated cache written in place (:mod:`adaptive_mllm.static_cache`), steps eager;
- ``captured``: the static cache with fixed shapes, and each (layer, row group)'s step captured once and
  replayed: a CUDA graph per kept layer on a GPU (a plan replays only the layers it keeps; skipped layers
  cost nothing, not even a launch), ``torch.compile`` of the same per-layer step on the CPU;
- ``auto``: ``static``. On the CPU compiled steps are faster once compiled, but a process pays 20-30 s of
  compiling first (docs/architecture.md has the numbers); on a GPU the captured path has not run yet
  (``bench/gpu_decode.py`` is the check), so it is opt-in there until it has been measured.

Why CUDA graphs, not ``torch.compile(mode="reduce-overhead")``, on the GPU: a plan is a different set of
layers, row groups and weight slices per request; one compiled whole step would be guarded on (and
recompiled for) each plan, while a graph per (layer, group) is captured at the first step and replayed as
the plan dictates. Prefill stays eager. The graphs belong to one request's cache (its buffers' addresses),
so a request pays one capture per kept layer at its first decoded token.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from adaptive_mllm.engine import Engine, PlanCache, RowGroup, decode_group
from adaptive_mllm.schedulers.plan import ExecutionPlan

DECODE_MODES = ("auto", "eager", "static", "captured")


def resolve_mode(mode: str, device: torch.device) -> str:
    """``auto`` -> what measured fastest on the device type; anything else is checked and returned."""
    if mode not in DECODE_MODES:
        raise ValueError(f"decode: unknown mode {mode!r}; known: {', '.join(DECODE_MODES)}")
    if mode == "auto":
        return "static"
    return mode


class GraphedSteps:
    """Per (layer, row group) CUDA graphs of :func:`~adaptive_mllm.engine.decode_group`, sharing static
    inputs: the hidden state flows through one buffer, which every graph reads and overwrites in place."""

    def __init__(self) -> None:
        self.graphs: dict[tuple[int, int], torch.cuda.CUDAGraph] = {}
        self.pool = None
        self.hidden: torch.Tensor | None = None  # [B, 1, H], the step's hidden state
        self.cos: torch.Tensor | None = None
        self.sin: torch.Tensor | None = None
        self._last: tuple[torch.Tensor, torch.Tensor] | None = None  # the step's (cos, sin), kept alive

    def __call__(self, index: int, layer: nn.Module, group: RowGroup, hidden, cos, sin, mask) -> torch.Tensor:
        self._load(hidden, cos, sin)
        key = (index, id(group))
        graph = self.graphs.get(key)
        if graph is None:
            graph = self.graphs[key] = self._capture(index, layer, group, mask)
        graph.replay()
        return self.hidden

    def _load(self, hidden: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> None:
        """Copy a step's new inputs into the static ones (once per step: later layers pass ``self.hidden``)."""
        if self.hidden is None:
            self.hidden, self.cos, self.sin = hidden.clone(), cos.clone(), sin.clone()
        if hidden is not self.hidden:
            self.hidden.copy_(hidden)
        if self._last is None or cos is not self._last[0]:
            self.cos.copy_(cos)
            self.sin.copy_(sin)
            self._last = (cos, sin)

    def _capture(self, index: int, layer: nn.Module, group: RowGroup, mask) -> torch.cuda.CUDAGraph:
        """Warm up on a side stream (rewrites this step's cache slot with the same values), then capture."""
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            decode_group(index, layer, group, self.hidden, self.cos, self.sin, mask)
        torch.cuda.current_stream().wait_stream(stream)
        if self.pool is None:
            self.pool = torch.cuda.graph_pool_handle()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            self.hidden.copy_(decode_group(index, layer, group, self.hidden, self.cos, self.sin, mask))
        return graph


def compiled_step() -> Callable[..., torch.Tensor]:
    """``decode_group`` under ``torch.compile``, one per process. Shapes are left to torch's automatic
    dynamic shapes: the first request compiles for its shapes, the second with other ones (batch size,
    cache capacity, slices) once more with symbolic sizes, and later ones reuse that (with ``dynamic=False``
    every new request shape cost a compile of 5-17 s on the tiny model). Each layer is its own guard."""
    global _COMPILED
    if _COMPILED is None:
        torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 256)  # a guard per layer
        _COMPILED = torch.compile(decode_group)
    return _COMPILED


_COMPILED: Callable[..., torch.Tensor] | None = None


class DecodeSteps:
    """Decode steps after a prefill into ``cache``, in one of :data:`DECODE_MODES`: ``steps(embeds,
    positions)`` -> the last layer's hidden states [B, 1, H] (with CUDA graphs a static buffer the next step
    overwrites: read it before). ``capacity``: positions per row the static cache holds at most (prompt + tokens
    to decode)."""

    def __init__(
        self, engine: Engine, cache: PlanCache, mode: str, capacity: int, device: torch.device, plan: ExecutionPlan | None = None
    ) -> None:
        self.engine, self.cache, self.plan = engine, cache, plan
        self.mode = resolve_mode(mode, device)
        self.run_group: Callable[..., torch.Tensor] | None = None
        if self.mode != "eager":
            cache.make_static(capacity, fixed_shapes=self.mode == "captured")
        if self.mode == "captured":
            self.run_group = GraphedSteps() if device.type == "cuda" else compiled_step()

    def __call__(self, embeds: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        if self.mode == "eager":
            mask = torch.ones(embeds.shape[:2], dtype=torch.long, device=embeds.device)
            hidden, _ = self.engine(embeds, mask, positions, self.plan, gated=False, cache=self.cache)
            return hidden
        return self.engine.decode_step(embeds, positions, self.cache, self.run_group)

    def rewind(self) -> None:
        """Back to the prefill (static modes): decode the same prompt again, as a benchmark does."""
        if self.cache.static is None:
            raise ValueError("only a static cache rewinds; the eager cache is restored by the caller")
        self.cache.static.rewind()

"""The static KV cache and the decode modes: the same tokens as the eager, growing cache for layer (L) and
head (H) plans, mixed budgets in one batch, with and without a token selector (PruMerge before the LLM,
FastV inside it); buffers written in place, that grow (eager steps) only by doubling their room, never past the
capacity; a clear error when a request needs more room."""

from __future__ import annotations

import pytest
import torch

from adaptive_mllm import decoding, static_cache
from adaptive_mllm.decoding import DecodeSteps, resolve_mode
from adaptive_mllm.engine import Engine, PlanCache, decode_group
from adaptive_mllm.generation import greedy_generate
from adaptive_mllm.inputs import position_ids_from_mask
from adaptive_mllm.static_cache import CacheFull
from tests.test_engine import _head_plan, _layer_plan, _left_padded
from tests.token_selection.test_composition import SCHEDULERS, SELECTORS, _images_batch, _model

BUDGETS = torch.tensor([0.9, 0.6, 0.75])  # one per example: a mixed-budget batch (left-padded prompts)
STEPS = 5


def _generate(model, batch, mode: str, budgets: torch.Tensor = BUDGETS):
    planner = model.planner
    inputs = planner.embed(batch["prompt_ids"], batch["prompt_attention_mask"], batch["pixel_values"])
    prepared = planner.prepare(inputs, budgets.to(inputs.embeds.device))
    return greedy_generate(
        model.engine, prepared.embeds, prepared.attention_mask, STEPS, [], prepared.plan, prepared.latency_positions,
        model.token_selector, prepared.image_mask, decode=mode,
    )  # fmt: skip


@pytest.fixture
def uncompiled(monkeypatch):
    """``captured`` on the CPU without torch.compile: the fixed-shape steps (whole buffers, masked, written
    at a device position) that a CUDA graph replays, run eagerly."""
    monkeypatch.setattr(decoding, "compiled_step", lambda: decode_group)


@pytest.fixture(params=[static_cache.FIRST_DECODE_ROOM, 1], ids=["room", "doubling"])
def first_room(request, monkeypatch):
    """The eager-step cache's first room as shipped, and of one token: it doubles at once and again and again."""
    monkeypatch.setattr(static_cache, "FIRST_DECODE_ROOM", request.param)
    return request.param


@pytest.mark.parametrize("selector", ["none", "prumerge", "fastv"])
@pytest.mark.parametrize("scheduler", SCHEDULERS)
def test_static_and_fixed_shape_decoding_give_the_eager_tokens(tokenizer_dir, scheduler, selector, uncompiled, first_room):
    torch.manual_seed(0)  # the scheduler's initialisation
    model = _model(tokenizer_dir, SCHEDULERS[scheduler](), None if selector == "none" else SELECTORS[selector]())
    batch = _images_batch(model)
    with torch.no_grad():
        eager = _generate(model, batch, "eager")
        plan = eager.plan
        rows = torch.cat([mask.flatten(1) for mask in (plan.layer_mask, plan.head_mask, plan.mlp_mask) if mask is not None], 1)
        assert len({tuple(row) for row in rows.tolist()}) > 1  # the rows' plans really differ
        for mode in ("static", "captured"):
            assert _generate(model, batch, mode).tokens == eager.tokens, mode


def test_a_padded_row_whose_kept_tokens_hold_no_padding_decodes_after_fastv(tokenizer_dir):
    """Eager decoding after FastV's drop kept the full mask (padding in it) where the kept tokens had none, and the
    layers behind the drop failed on the shapes: one left-padded row, as a row of a padded batch taken alone."""
    torch.manual_seed(0)
    model = _model(tokenizer_dir, SCHEDULERS["L"](), SELECTORS["fastv"]())
    batch = _images_batch(model)
    padded = int((batch["prompt_attention_mask"] == 0).any(-1).nonzero()[0])  # a row with padding
    row = {key: value[padded : padded + 1] if isinstance(value, torch.Tensor) and value.shape[0] == 3 else value for key, value in batch.items()}
    assert not bool(row["prompt_attention_mask"].all())
    with torch.no_grad():
        tokens = {mode: _generate(model, row, mode, BUDGETS[:1]).tokens for mode in ("eager", "static")}
    assert tokens["eager"] == tokens["static"] and len(tokens["eager"][0]) == STEPS


def test_compiled_decoding_gives_the_eager_tokens(tokenizer_dir):
    """``captured`` on the CPU: torch.compile of the per-layer step (compiling takes most of this test)."""
    torch.manual_seed(0)
    model = _model(tokenizer_dir, SCHEDULERS["L"](), SELECTORS["fastv"]())
    batch = _images_batch(model)
    with torch.no_grad():
        assert _generate(model, batch, "captured").tokens == _generate(model, batch, "eager").tokens


class Prefilled:
    """Three left-padded prompts prefilled under a layer or head plan that differs per row, ready to decode
    ``num_tokens`` forced random tokens in a decode mode."""

    def __init__(self, backbone, level: str, num_tokens: int) -> None:
        self.backbone = backbone
        self.ids, self.mask = _left_padded(backbone, [7, 4, 6], seed=5)
        self.plan = _layer_plan(3, 4, seed=6) if level == "layer" else _head_plan(backbone, 3, seed=6)
        self.engine = Engine(backbone)
        self.tokens = torch.randint(5, len(backbone.tokenizer), (3, num_tokens), generator=torch.Generator().manual_seed(1))
        self.position = position_ids_from_mask(self.mask)[:, -1:]  # [B, 1] the last prompt token's

    def steps(self, mode: str) -> tuple[PlanCache, DecodeSteps]:
        """A fresh prefill, and its decode steps with room for the prompt plus ``num_tokens``."""
        cache = PlanCache()
        self.engine(self.backbone.embed(self.ids), self.mask, position_ids_from_mask(self.mask), self.plan, gated=False, cache=cache)
        return cache, DecodeSteps(self.engine, cache, mode, cache.length + self.tokens.shape[1], self.ids.device, self.plan)

    def step(self, steps: DecodeSteps, index: int) -> torch.Tensor:
        """Decode forced token ``index`` at its position."""
        return steps(self.backbone.embed(self.tokens[:, index : index + 1]), self.position + 1 + index)


@pytest.mark.parametrize("level", ["layer", "head"])
def test_decode_steps_match_the_eager_hidden_states(gqa_backbone, level, uncompiled):
    """Not only the argmax: every step's hidden states, for plans that differ per row (merged head groups)."""
    prefilled = Prefilled(gqa_backbone, level, 4)
    with torch.no_grad():
        results = {}
        for mode in ("eager", "static", "captured"):
            _, steps = prefilled.steps(mode)
            results[mode] = [prefilled.step(steps, i) for i in range(4)]
        for mode in ("static", "captured"):
            for eager, other in zip(results["eager"], results[mode], strict=True):
                torch.testing.assert_close(other, eager, atol=1e-5, rtol=1e-5)


def _buffers(cache: PlanCache) -> list[tuple[int, int, tuple[int, ...]]]:
    """(address, storage bytes, shape) of every buffer the static cache owns."""
    tensors = [cache.static.cursor.key_mask]
    tensors += [t for groups in cache.groups for group in groups if group.static is not None for t in (group.static.keys, group.static.values)]
    return [(t.data_ptr(), t.untyped_storage().nbytes(), tuple(t.shape)) for t in tensors]


@pytest.mark.parametrize("mode", ["static", "captured"])
def test_the_static_cache_never_grows_and_says_when_it_is_full(gqa_backbone, mode, uncompiled):
    backbone = gqa_backbone
    ids, mask = _left_padded(backbone, [6, 4], seed=7)
    engine = Engine(backbone)
    plan = _head_plan(backbone, 2, seed=8)
    with torch.no_grad():
        cache = PlanCache()
        engine(backbone.embed(ids), mask, position_ids_from_mask(mask), plan, gated=False, cache=cache)
        capacity = cache.length + 3
        steps = DecodeSteps(engine, cache, mode, capacity, ids.device, plan)
        before = _buffers(cache)
        assert len(before) > 3 and all(shape[-2 if len(shape) == 4 else -1] == capacity for _, _, shape in before)
        token, position = ids[:, -1:], position_ids_from_mask(mask)[:, -1:]
        for step in range(3):
            steps(backbone.embed(token), position + 1 + step)
            assert _buffers(cache) == before  # written in place: same addresses, same sizes
        assert cache.length == capacity
        with pytest.raises(CacheFull, match=f"holds {capacity} positions per row, this request needs {capacity + 1}"):
            steps(backbone.embed(token), position + 4)
        assert cache.static.cursor.length == capacity  # nothing written by the refused step
        steps.rewind()  # back to the prefill: decodes again in the same buffers
        assert cache.static.cursor.length == capacity - 3
        steps(backbone.embed(token), position + 1)
        assert _buffers(cache) == before


@pytest.mark.parametrize("level", ["layer", "head"])
def test_an_eager_step_cache_starts_small_and_doubles_up_to_its_capacity(gqa_backbone, level, monkeypatch):
    """An answer allowed many tokens that stops early holds memory for the first room only; a long one doubles the
    buffers a few times (never past the capacity, then CacheFull) and decodes as the eager cache does."""
    monkeypatch.setattr(static_cache, "FIRST_DECODE_ROOM", 2)
    prefilled = Prefilled(gqa_backbone, level, 12)
    backbone, tokens, position = gqa_backbone, prefilled.tokens, prefilled.position
    with torch.no_grad():
        results, sizes = {}, []
        for mode in ("eager", "static"):
            cache, steps = prefilled.steps(mode)
            prefill, capacity = cache.length, cache.length + tokens.shape[1]
            results[mode] = []
            for i in range(tokens.shape[1]):
                results[mode].append(prefilled.step(steps, i))
                if mode == "static":
                    sizes.append({shape[-2 if len(shape) == 4 else -1] for _, _, shape in _buffers(cache)})
        for eager, static in zip(results["eager"], results["static"], strict=True):
            torch.testing.assert_close(static, eager, atol=1e-5, rtol=1e-5)
        # room for 2 decoded tokens, then 4, 8, and 12 = the capacity (16 would pass it): the prompt is not doubled
        assert capacity == prefill + 12
        grown = [prefill + 2] * 2 + [prefill + 4] * 2 + [prefill + 8] * 4 + [capacity] * 4
        assert sizes == [{size} for size in grown]
        with pytest.raises(CacheFull, match=f"holds {capacity} positions per row, this request needs {capacity + 1}"):
            steps(backbone.embed(tokens[:, :1]), position + 1 + tokens.shape[1])
        steps.rewind()  # back to the prefill and its first room: a benchmark's next run pays the growth again
        steps(backbone.embed(tokens[:, :1]), position + 1)
        assert {shape[-2 if len(shape) == 4 else -1] for _, _, shape in _buffers(cache)} == {prefill + 2}
        torch.testing.assert_close(steps(backbone.embed(tokens[:, 1:2]), position + 2), results["eager"][1], atol=1e-5, rtol=1e-5)


def _prefilled(backbone, lengths: list[int]) -> tuple[PlanCache, Engine, torch.Tensor]:
    """A grown cache after the prefill of left-padded prompts of ``lengths`` (no plan)."""
    ids, mask = _left_padded(backbone, lengths, seed=7)
    engine = Engine(backbone)
    cache = PlanCache()
    with torch.no_grad():
        engine(backbone.embed(ids), mask, position_ids_from_mask(mask), gated=False, cache=cache)
    return cache, engine, ids


def test_a_prefill_longer_than_the_cache_is_refused(gqa_backbone):
    cache, _, _ = _prefilled(gqa_backbone, [6, 4])
    with pytest.raises(CacheFull, match="holds 4 positions per row, this request needs 6"):
        cache.make_static(4)


def test_a_static_cache_is_only_decoded_by_decode_step(gqa_backbone):
    with pytest.raises(ValueError, match="make_static needs a prefilled cache"):
        PlanCache().make_static(8)
    cache, engine, ids = _prefilled(gqa_backbone, [5, 5])
    backbone = gqa_backbone
    with torch.no_grad():
        with pytest.raises(ValueError, match="call cache.make_static"):
            engine.decode_step(backbone.embed(ids[:, :1]), torch.full((2, 1), 5), cache)
        cache.make_static(8)
        with pytest.raises(ValueError, match="decoded by Engine.decode_step"):
            engine(backbone.embed(ids[:, :1]), torch.ones(2, 1, dtype=torch.long), torch.full((2, 1), 5), gated=False, cache=cache)


def test_decode_modes_resolve(monkeypatch):
    assert resolve_mode("auto", torch.device("cpu")) == "static"
    assert resolve_mode("auto", torch.device("cuda")) == "static"  # captured is opt-in until measured on a GPU
    assert resolve_mode("eager", torch.device("cuda")) == "eager"
    with pytest.raises(ValueError, match="unknown mode 'graphs'; known: auto, eager, static, captured"):
        resolve_mode("graphs", torch.device("cpu"))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
def test_cuda_graph_decoding_gives_the_eager_tokens(tokenizer_dir):
    model = _model(tokenizer_dir, SCHEDULERS["L"](), SELECTORS["fastv"]()).cuda()
    batch = {key: value.cuda() if isinstance(value, torch.Tensor) else value for key, value in _images_batch(model).items()}
    with torch.no_grad():
        assert _generate(model, batch, "captured").tokens == _generate(model, batch, "eager").tokens


class _ReplayedSteps(decoding.GraphedSteps):
    """GraphedSteps with a stand-in for capture (no GPU here): a 'graph' that replays the step from the static
    inputs, so the plumbing (one hidden buffer for all layers, the step's rotary tables copied in once,
    a graph per (layer, group) reused every step) is checked on the CPU."""

    captures = 0

    def _capture(self, index, layer, group, mask):
        class Replay:
            def replay(_):
                self.hidden.copy_(decode_group(index, layer, group, self.hidden, self.cos, self.sin, mask))

        self.captures += 1
        return Replay()


def test_graphed_steps_feed_every_layer_from_one_static_buffer(gqa_backbone, monkeypatch):
    backbone = gqa_backbone
    ids, mask = _left_padded(backbone, [7, 4, 6], seed=5)
    plan = _head_plan(backbone, 3, seed=6)
    engine = Engine(backbone)
    tokens = torch.randint(5, len(backbone.tokenizer), (3, 4), generator=torch.Generator().manual_seed(1))
    monkeypatch.setattr(decoding, "compiled_step", _ReplayedSteps)  # "captured" on the CPU: the graphs' plumbing
    with torch.no_grad():
        results = {}
        for mode in ("eager", "captured"):
            cache = PlanCache()
            engine(backbone.embed(ids), mask, position_ids_from_mask(mask), plan, gated=False, cache=cache)
            steps = DecodeSteps(engine, cache, mode, cache.length + 4, ids.device, plan)
            position = position_ids_from_mask(mask)[:, -1:]
            results[mode] = [steps(backbone.embed(tokens[:, i : i + 1]), position + 1 + i).clone() for i in range(4)]
    assert steps.run_group.captures == sum(len(groups) for groups in cache.groups)  # once per (layer, group), at step 1
    for eager, graphed in zip(results["eager"], results["captured"], strict=True):
        torch.testing.assert_close(graphed, eager, atol=1e-5, rtol=1e-5)

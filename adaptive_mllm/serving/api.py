"""DeadlineAPI: the LitServe API behind ``POST /v1/chat/completions``.

Requests that arrive together become one ``AdaptiveMLLM.generate`` call with one budget per request
(the engine runs mixed plans in one batch). A request carries a ``budget`` or a ``deadline_ms``; a
deadline becomes the largest budget the latency model, scaled by its online correction, predicts to
finish in the time left once it reached the worker (the deadline counts from its arrival at the
server). A bad request never fails its batch: it is answered with its own 4xx status. Images are decoded
ahead, in threads, while the model answers the batch before (:mod:`~adaptive_mllm.serving.preparing`).
"""

from __future__ import annotations

import base64
import io
import json
import logging
import time
import uuid
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import litserve as ls
import torch
from fastapi.responses import JSONResponse
from PIL import Image

from adaptive_mllm.reporting import write_text_atomically
from adaptive_mllm.serving.arrival import RECEIVED, StampingLoop, waited_ms
from adaptive_mllm.serving.correction import RunningRatio
from adaptive_mllm.serving.latency import LatencyModel
from adaptive_mllm.serving.lifecycle import ServerProcesses
from adaptive_mllm.serving.overhead import ServerTimes
from adaptive_mllm.serving.requests import (
    ChatRequest,
    RequestError,
    RequestLimits,
    parse_chat_request,
    read_request_image,
)

log = logging.getLogger(__name__)


class ModelSetupError(RuntimeError):
    """The worker could not build the model; its message is the cause, in one line."""


def _one_line_setup_error(record: logging.LogRecord) -> bool:
    """LitServe logs a worker's setup failure with its traceback: for the model's own errors (which name their
    file) the message alone says it."""
    error = record.exc_info[1] if record.exc_info else None
    if isinstance(error, ModelSetupError):
        record.msg, record.args, record.exc_info, record.exc_text = f"the model could not be built: {error}", (), None, None
    return True
API_PATH = "/v1/chat/completions"
MODELS_PATH = "/v1/models"  # what OpenAI clients (and chat UIs, when they connect) list to pick a model
SERVED_MODEL_NAME = "adaptive-mllm"  # the reply's "model" and /v1/models' one id; any requested name is accepted
# The most a deadline-driven budget may rise from one batch to the next. Budgets fall at once when the
# correction says so, but rise in steps: when another process shares the cores, small budgets can look
# fast (an answer fits in one scheduler time slice) while a large one would not, and a jump straight back
# to budget 1.0 is a miss; a step up that overshoots costs a little time, not the deadline. Only budgets the
# machine held down move the ceiling: a request's own tight deadline says nothing about the machine, and neither
# does one no budget can meet now (it runs at its minimum: counted, its minimum would cap every other client the
# slowdown lowers, for as long as the slowdown lasts; so its own budget comes back in one batch afterwards). A deadline
# that allows budget 1.0 even at the highest correction since the ceiling left 1.0 is not capped: the slowdown seen
# would not lower it, so there is no rise to hold back. The ceiling lapses by evidence, not by time: a batch that
# ran within the latency margin of the profile at mean budget b shows the machine runs b as profiled, so the
# ceiling is at least b + BUDGET_RISE after it (a batch at 1.0 lifts it at once; small budgets, which can look
# fast beside a co-located job, lift it only as far as they ran).
BUDGET_RISE = 0.1
PIXELS = "__pixel_values"  # a payload's image decoded ahead: a tensor or a RequestError, never JSON
PREPARE_THREADS = 2  # so one large image being decoded does not hold up the next request's
METRICS_LOG_SECONDS = 10.0  # the worker logs its counts at most this often (every batch would flood the log)
WARM_UP_TOKENS = 2  # new tokens per warm-up call: the prefill and the first decoding step, at little cost


class Choice(NamedTuple):
    """One request's budget and why."""

    budget: float
    requested: str  # what set it: "budget", "deadline", "default" or "pinned"
    feasible: bool  # False: even the smallest budget was predicted to miss the deadline
    # the correction or the ceiling, not the deadline alone, kept it below its quiet-machine budget, and the deadline
    # can be met (a request no budget can save runs at its minimum: see BUDGET_RISE)
    held_down: bool = False


@dataclass
class Answer:
    """What one request got: the text and what it cost."""

    text: str
    budget: float
    requested: str  # what set the budget: "budget", "deadline", "default" or "pinned"
    deadline_ms: float | None
    deadline_feasible: bool  # False: even the smallest budget was predicted to miss the deadline
    units: float
    flops_fraction: float
    predicted_ms: float | None
    measured_ms: float  # the batch's generate call
    queued_ms: float  # from arrival at the server to the start of the batch
    batch_size: int
    prompt_tokens: int  # the request's own prompt, image placeholders included
    completion_tokens: int
    finish_reason: str  # "stop", or "length" when the answer reached its cap (max_tokens) without a stop token
    correction: float = 1.0  # the online correction the budgets were chosen with (and predicted_ms scaled by)


class DeadlineAPI(ls.LitAPI):
    """LitAPI over an AdaptiveMLLM built in the worker by ``build_model`` (a picklable callable).

    Args:
        build_model: returns the AdaptiveMLLM (weights loaded); called once per worker in ``setup``.
        profile: latency profile JSON; without one, requests with ``deadline_ms`` are refused (400).
        limits: what requests may contain (image folder, sizes, strict fields).
        margin: the latency model's safety margin.
        metrics_path: the worker writes its counts here (JSON) after every batch; ``/metrics`` serves them.
        pinned_budget: answer every request at this budget, ignoring its budget / deadline (a baseline
            for the load test); None = adaptive.
        max_batch_size, batch_timeout: LitServe's dynamic batching (``batch_timeout=0``: no waiting, see
            :mod:`~adaptive_mllm.serving.arrival`).
        threads: torch's intra-op threads in the worker (None: torch's default, one per core).
        prepare_threads: threads decoding images ahead while the model runs (0: each batch's images are
            decoded when it is collected, in the model's loop).
        times: the server's time outside this worker, measured by the HTTP server's middleware and taken
            off every deadline (None: not counted).
        processes: the server's HTTP processes; given, the worker leaves SIGINT and SIGTERM to the main process
            while they run (None: the signals' defaults, as in-process).
    """

    def __init__(
        self,
        build_model: Callable[[], Any],
        profile: str | None = None,
        limits: RequestLimits | None = None,
        margin: float = 0.2,
        metrics_path: str | None = None,
        pinned_budget: float | None = None,
        max_batch_size: int = 8,
        batch_timeout: float = 0.0,
        threads: int | None = None,
        times: ServerTimes | None = None,
        prepare_threads: int = PREPARE_THREADS,
        served_model_name: str = SERVED_MODEL_NAME,
        processes: ServerProcesses | None = None,
    ) -> None:
        loop = StampingLoop(prepare_threads)
        super().__init__(max_batch_size=max_batch_size, batch_timeout=batch_timeout, api_path=API_PATH, loop=loop)
        self.build_model = build_model
        self.profile = profile
        self.limits = limits or RequestLimits()
        self.margin = margin
        self.metrics_path = metrics_path
        self.pinned_budget = pinned_budget
        self.threads = threads
        self.times = times
        self.served_model_name = served_model_name
        self.processes = processes

    # --- worker setup --------------------------------------------------------------------------------
    def setup(self, device: str) -> None:
        if self.processes is not None:  # a group signal (Ctrl+C) no longer ends the worker under its batch
            self.processes.guard_worker()
        if self.threads is not None:
            torch.set_num_threads(self.threads)
        try:
            model = self.build_model()
        except Exception as error:  # a missing tokenizer, a checkpoint of another recipe: said in one line
            logging.getLogger("litserve.loops.loops").addFilter(_one_line_setup_error)
            raise ModelSetupError(f"{type(error).__name__}: {error}") from None
        model.to(device).eval()
        self.model = model
        self.torch_device = torch.device(device)
        self.processor = model.backbone.input_processor()
        self.latency = LatencyModel.load(self.profile, self.margin) if self.profile else None
        self.ratio = RunningRatio()
        self.deadline_ceiling = 1.0  # the highest held-down deadline budget of the last such batch + BUDGET_RISE
        self.ceiling_correction = 0.0  # the highest correction since the ceiling left 1.0 (0: it is at 1.0)
        self.counts: Counter[str] = Counter()
        self.decode_steps = 0
        # decoding steps of a generate call = LM head calls - 1 (the first token comes out of the prefill)
        model.backbone.lm_head.register_forward_hook(self._count_step)
        if not log.handlers and not logging.getLogger().handlers:  # the worker process: nobody set up logging
            handler = logging.StreamHandler()
            handler.setFormatter(logging.Formatter("%(asctime)s %(name)s %(message)s"))
            log.addHandler(handler)
            log.setLevel(logging.INFO)
        self.metrics_errors: set[str] = set()  # the write errors logged already (once each, not every batch)
        self._warm_up()
        self.logged_at = -METRICS_LOG_SECONDS
        self._write_metrics()

    def _warm_up(self) -> None:
        """A few ``generate`` calls before serving: the first calls after a load are slower than the later ones
        (lazy initialisation, the allocator, the first kernels), so a fresh server's first request could miss its
        deadline flagged feasible, and its ratio then led the correction's window for about 10 batches (every
        deadline at its minimum). A dummy request is read as a client's is, then answered at budget 1.0 and at its
        minimum, alone and at ``max_batch_size``. The calls bypass ``_answer``: neither the correction nor the
        counts see them. LitServe marks the worker ready, and starts the HTTP server that answers /health, only
        once ``setup`` returns."""
        started = time.perf_counter()
        body = warm_up_body(min(WARM_UP_TOKENS, self.model.max_new_tokens))
        request = self.decode_request(self.prepare_request(body))
        if isinstance(request, RequestError):  # e.g. a maximum length too short for the dummy prompt
            log.warning("warm-up skipped: the dummy request was refused (%s)", request.message)
            return
        dtype = next(self.model.backbone.parameters()).dtype
        calls = 0
        try:
            for size in sorted({1, self.max_batch_size}):
                batch = collate([request] * size, self.processor.pad_token_id, self.torch_device, dtype)
                for budget in (1.0, self._minimum(request)):
                    budgets = torch.full((size,), budget, dtype=torch.float32, device=self.torch_device)
                    self.model.generate(batch, budgets, [request.max_tokens] * size, at_least_minimum=True)
                    calls += 1
            _now(self.torch_device)  # the device's queue is done
        except Exception as error:  # out of memory at --max_batch_size, say: serve anyway, as before the warm-up
            log.warning("warm-up stopped after %d generate calls (%s: %s); serving without the rest", calls, type(error).__name__, error)
            if self.torch_device.type == "cuda":
                torch.cuda.empty_cache()
        self.decode_steps = 0
        log.info("warm-up: %d generate calls in %.2f s", calls, time.perf_counter() - started)

    def _count_step(self, module: Any, args: Any, output: Any) -> None:
        self.decode_steps += 1

    # --- one request ---------------------------------------------------------------------------------
    def prepare_request(self, request: dict) -> dict:
        """The payload with its image decoded (the loop's preparing threads call this ahead of
        ``decode_request``; thread-safe, no tokenizer)."""
        return {**request, PIXELS: read_request_image(request, self.processor, self.limits)}

    def decode_request(self, request: dict) -> ChatRequest | RequestError:
        """Never raises: an error is carried to ``encode_response``, so it fails only its own request."""
        received = request.pop(RECEIVED, None) if isinstance(request, dict) else None
        pixels = request.pop(PIXELS, None) if isinstance(request, dict) else None
        if not isinstance(pixels, (torch.Tensor, RequestError)):
            pixels = None  # not prepared here (a client's field of that name is JSON, never a tensor)
        try:
            parsed = parse_chat_request(
                request, self.processor, self.model.max_new_tokens, self.limits, pixels, self.model.planner.uses_latency_token
            )
        except RequestError as error:
            return error
        except Exception as error:  # noqa: BLE001 - a bug reading one request must not fail its whole batch
            log.exception("reading a request failed")
            return RequestError(500, f"the server could not read this request ({type(error).__name__})", "body")
        parsed.received = received
        if parsed.deadline_ms is not None and self.latency is None and self.pinned_budget is None:
            return RequestError(400, "this server has no latency profile (start it with --profile)", "deadline_ms")
        return parsed

    def batch(self, inputs: list[Any]) -> list[Any]:
        return list(inputs)

    def unbatch(self, output: list[Any]) -> list[Any]:
        return output

    def encode_response(self, output: Answer | RequestError):  # noqa: ANN201 - LitServe reads a return annotation as the response model
        """The OpenAI chat completion plus an ``adaptive`` field; a bad request as its own 4xx response."""
        if isinstance(output, RequestError):
            return JSONResponse(output.body(), status_code=output.status)
        return {
            "id": f"chatcmpl-{uuid.uuid4().hex}",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": self.served_model_name,
            "choices": [
                {"index": 0, "message": {"role": "assistant", "content": output.text}, "finish_reason": output.finish_reason}
            ],
            "usage": {
                "prompt_tokens": output.prompt_tokens,
                "completion_tokens": output.completion_tokens,
                "total_tokens": output.prompt_tokens + output.completion_tokens,
            },
            "adaptive": {
                "budget": output.budget,
                "requested": output.requested,
                "deadline_ms": output.deadline_ms,
                "deadline_feasible": output.deadline_feasible,
                "units": output.units,
                "flops_fraction": output.flops_fraction,
                "predicted_ms": output.predicted_ms,
                "measured_ms": output.measured_ms,
                "queued_ms": output.queued_ms,
                "batch_size": output.batch_size,
                "correction": output.correction,
            },
        }

    # --- one batch -----------------------------------------------------------------------------------
    def predict(self, items: list[ChatRequest | RequestError]) -> list[Answer | RequestError]:
        valid = [item for item in items if isinstance(item, ChatRequest)]
        self.counts["requests"] += len(items)
        self.counts["rejected"] += len(items) - len(valid)
        answers = iter(self._answer(valid) if valid else [])
        outputs = [next(answers) if isinstance(item, ChatRequest) else item for item in items]
        self._write_metrics()
        return outputs

    def _answer(self, requests: list[ChatRequest]) -> list[Answer]:
        dtype = next(self.model.backbone.parameters()).dtype
        batch = collate(requests, self.processor.pad_token_id, self.torch_device, dtype)
        prompt_tokens = batch["prompt_ids"].shape[1] + int(self.model.planner.uses_latency_token)
        limits = [request.max_tokens or self.model.max_new_tokens for request in requests]
        new_tokens = max(limits)  # the batch decodes until its longest allowed answer is done
        size = len(requests)
        queued = [waited_ms(request.received) for request in requests]  # time spent before this batch
        alone = [self._choose(r, q, prompt_tokens, new_tokens, size) for r, q in zip(requests, queued, strict=True)]
        held_down = [choice.budget for choice in alone if choice.held_down]
        if held_down:  # the machine's limit, before the batch shares its tightest deadline
            self._set_ceiling(max(held_down) + BUDGET_RISE)
        choices = self._share_the_batch(alone, requests, queued, prompt_tokens, new_tokens)
        budgets = torch.tensor([choice.budget for choice in choices], dtype=torch.float32)
        correction = self.ratio.value  # the one the budgets were chosen with, reported beside predicted_ms
        predicted = None  # the batch's, before this batch corrects the model: one generate call, one time
        if self.latency is not None:
            predicted = self.latency.predict_ms(float(budgets.mean()), prompt_tokens, new_tokens, size, correction)
        self.decode_steps = 0
        start = _now(self.torch_device)
        # the minimum chosen against is the prompt's before token selection; generate raises a budget to the one
        # counted after it (a selector inside the LLM, or one that shortens the prompt, moves it)
        out = self.model.generate(batch, budgets.to(self.torch_device), limits, at_least_minimum=True)
        measured_ms = 1000 * (_now(self.torch_device) - start)
        # what ran: the chosen budget (as chosen, not its float32) unless generate raised it
        ran = [budget_that_ran(c.budget, r) for r, c in zip(out["budgets"], choices, strict=True)]
        budgets = torch.tensor(ran, dtype=budgets.dtype)
        steps = max(self.decode_steps - 1, 0)
        units, fractions = out["units_per_example"], out["flops_fractions"]
        per_token = out["decode_seconds_per_token"]
        ratio = self._correct(budgets, prompt_tokens, new_tokens, size, measured_ms, steps, per_token)  # this batch's
        if ratio is not None and ratio <= 1.0 + self.latency.margin:  # this batch ran as profiled: see BUDGET_RISE
            self._raise_ceiling(sum(ran) / size + BUDGET_RISE)
        self.counts["batches"] += 1
        self.counts["answered"] += size
        answers = []
        for index, (_, requested, feasible, _) in enumerate(choices):
            request = requests[index]
            budget = ran[index]
            if request.deadline_ms is not None:
                self.counts["deadline_requests"] += 1
                self.counts["deadline_met"] += int(queued[index] + measured_ms <= request.deadline_ms)
                self.counts["deadline_infeasible"] += int(not feasible)
            generated = out["answer_tokens"][index]
            answers.append(
                Answer(out["answers"][index], budget, requested, request.deadline_ms, feasible, units[index],
                       fractions[index], predicted, measured_ms, queued[index], size, len(request.prompt_ids), generated,
                       "length" if generated >= limits[index] else "stop", correction)
            )  # fmt: skip
        return answers

    def _choose(self, request: ChatRequest, queued_ms: float, prompt_tokens: int, new_tokens: int, size: int) -> Choice:
        """The request's budget within what the scheduler admits; a deadline counts from the request's
        arrival, so ``queued_ms`` is already spent, and the time the server spends outside this worker
        (reading the request, writing the answer) is still to come."""
        minimum = self._minimum(request)
        if self.pinned_budget is not None:
            return Choice(max(self.pinned_budget, minimum), "pinned", True)
        if request.budget is not None:
            return Choice(max(request.budget, minimum), "budget", True)
        if request.deadline_ms is not None:
            remaining = self._remaining_ms(request, queued_ms)
            if remaining <= 0:
                return Choice(minimum, "deadline", False)
            correction = self.ratio.value
            choice = self.latency.budget_for_deadline(remaining, prompt_tokens, new_tokens, size, minimum, correction)
            budget = choice.budget
            if budget > self.deadline_ceiling and not self._allows_full_budget(remaining, prompt_tokens, new_tokens, size, minimum):
                budget = max(self.deadline_ceiling, minimum)
            quiet = choice.budget  # what the deadline alone allows on a machine no slower than profiled
            if correction > 1.0:
                quiet = self.latency.budget_for_deadline(remaining, prompt_tokens, new_tokens, size, minimum).budget
            # a deadline no budget meets now runs at its minimum and holds nobody back: counted as held down, its
            # minimum set the ceiling for every client the slowdown lowers (one at 0.6 under a 3x slowdown ran at
            # 0.35). The price: such a deadline's own budget comes back in one batch when the slowdown ends (§4)
            return Choice(budget, "deadline", choice.met, choice.met and budget < quiet - 1e-9)
        return Choice(max(self.model.budget, minimum), "default", True)

    def _set_ceiling(self, ceiling: float) -> None:
        self.deadline_ceiling = 1.0 if ceiling >= 1.0 - 1e-9 else ceiling  # steps of 0.1 add up to 0.9999999999999999
        # the slowdown the ceiling holds budgets back from (kept while the correction falls back)
        self.ceiling_correction = max(self.ceiling_correction, self.ratio.value) if self.deadline_ceiling < 1.0 else 0.0

    def _raise_ceiling(self, ceiling: float) -> None:
        """Lift the ceiling to ``ceiling`` if it is lower (never lowers it: only held-down budgets do that)."""
        if ceiling > self.deadline_ceiling:
            self._set_ceiling(ceiling)

    def _allows_full_budget(self, remaining_ms: float, prompt_tokens: int, new_tokens: int, size: int, minimum: float) -> bool:
        """Whether ``remaining_ms`` allows budget 1.0 even at the highest correction since the ceiling left 1.0 (and
        at the current one): the slowdown the ceiling guards against would not lower such a deadline's budget, so
        the ceiling does not cap it (a loose deadline is not held back by another client's tight one)."""
        correction = max(self.ratio.value, self.ceiling_correction)
        choice = self.latency.budget_for_deadline(remaining_ms, prompt_tokens, new_tokens, size, minimum, correction)
        return choice.met and choice.budget >= 1.0

    def _minimum(self, request: ChatRequest) -> float:
        return smallest_budget(self.model, request.prompt_ids)

    def _remaining_ms(self, request: ChatRequest, queued_ms: float) -> float:
        """What is left of a request's deadline for the worker: minus the time it queued, and minus the time
        the server will spend outside the worker (reading the request, writing the answer)."""
        outside = self.times.outside_ms if self.times is not None else 0.0
        return request.deadline_ms - queued_ms - outside

    def _share_the_batch(
        self, choices: list[Choice], requests: list[ChatRequest], queued: list[float], prompt_tokens: int, new_tokens: int
    ) -> list[Choice]:
        """Budgets that fit the batch's tightest deadline together.

        A batch is one ``generate`` call: every request in it is answered when the batch is done, after about
        the time of its budgets' mean. Each deadline chose its budget alone, so a request that queued longer
        would miss because a fresher one chose more. Here the deadline-driven budgets above a level are
        lowered to it (never below a request's minimum) until the mean fits the tightest deadline; budgets
        a request asked for are kept. A deadline the batch misses even with every deadline row at its minimum
        (one that passed while it queued, or a microsecond) runs at its minimum, flagged, and sets no level:
        lowering the others would not save it."""
        rows = [index for index, choice in enumerate(choices) if choice.requested == "deadline"]
        if self.latency is None or len(choices) == 1 or not rows:
            return choices
        size = len(choices)
        remaining = {index: self._remaining_ms(requests[index], queued[index]) for index in rows}
        minimum = {index: self._minimum(requests[index]) for index in rows}
        chosen = [choice.budget for choice in choices]

        def levelled(level: float) -> list[float]:
            return [max(min(b, level), minimum[i]) if i in remaining else b for i, b in enumerate(chosen)]

        def fits(budgets: list[float], left: float) -> bool:
            batch_ms = self.latency.predict_ms(sum(budgets) / size, prompt_tokens, new_tokens, size, self.ratio.value)
            return batch_ms * (1 + self.latency.margin) <= left * (1 + 1e-9)

        lowest = levelled(0.0)  # every deadline row at its minimum: the fastest this batch can be
        hopeless = {index for index, left in remaining.items() if left <= 0 or not fits(lowest, left)}
        for index in hopeless:
            chosen[index] = minimum[index]
        meetable = [left for index, left in remaining.items() if index not in hopeless]
        if meetable:
            # the mean budget the batch can afford by its tightest meetable deadline
            mean_cap = self.latency.budget_for_deadline(min(meetable), prompt_tokens, new_tokens, size, 0.0, self.ratio.value).budget
            if sum(chosen) / size > mean_cap:
                low, high = 0.0, 1.0
                for _ in range(40):  # bisection on the level: the mean never falls as the level rises
                    middle = (low + high) / 2
                    low, high = (middle, high) if sum(levelled(middle)) / size <= mean_cap else (low, middle)
                chosen = levelled(low)
        met = {index: index not in hopeless and fits(chosen, left) for index, left in remaining.items()}
        return [choice._replace(budget=chosen[i], feasible=met.get(i, choice.feasible)) for i, choice in enumerate(choices)]

    def _correct(
        self, budgets: torch.Tensor, prompt_tokens: int, new_tokens: int, size: int, measured_ms: float, steps: int,
        decode_seconds_per_token: float,
    ) -> float | None:
        """Fold the batch into the running ratio, as if it had decoded all ``new_tokens`` (answers that
        stop early would otherwise look fast); returns the batch's own measured / predicted (None: no profile)."""
        if self.latency is None:
            return None
        budget = float(budgets.mean())
        if steps == 0:
            predicted = self.latency.predict_ms(budget, prompt_tokens, 1, size)
        else:
            predicted = self.latency.predict_ms(budget, prompt_tokens, new_tokens, size)
            measured_ms += (new_tokens - 1 - steps) * 1000 * decode_seconds_per_token
        self.ratio.update(predicted, measured_ms)
        return measured_ms / predicted if predicted > 0 else None

    # --- counts --------------------------------------------------------------------------------------
    def _write_metrics(self) -> None:
        counts = {"requests": 0, "answered": 0, "rejected": 0, "batches": 0, "deadline_requests": 0, "deadline_met": 0,
                  "deadline_infeasible": 0, **self.counts}  # fmt: skip
        counts["correction"] = self.ratio.value
        if self.times is not None:
            counts["outside_worker_ms"] = self.times.outside_ms
        if time.monotonic() - self.logged_at >= METRICS_LOG_SECONDS:
            self.logged_at = time.monotonic()
            log.info("metrics %s", json.dumps(counts, sort_keys=True))
        if self.metrics_path is None:
            return
        path = Path(self.metrics_path)
        # best effort: the answers are computed, and a folder removed (a tmp cleaner), a full disk or a read-only one
        # must not turn them into 500s; /metrics shows the last counts written meanwhile
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            write_text_atomically(path, json.dumps(counts, sort_keys=True))  # readers never see half a file
        except OSError as error:
            if str(error) not in self.metrics_errors:  # once per distinct error, not every batch
                self.metrics_errors.add(str(error))
                log.warning("could not write the counts to %s (%s); answering on", path, error)


def warm_up_body(max_tokens: int) -> dict[str, Any]:
    """The warm-up's request, as a client would send it: a grey PNG as a data URL, a short question, budget 1.0."""
    buffer = io.BytesIO()
    Image.new("RGB", (64, 64), (128, 128, 128)).save(buffer, "PNG")
    url = "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()
    content = [{"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": "What is in the image?"}]
    return {"messages": [{"role": "user", "content": content}], "budget": 1.0, "max_tokens": max_tokens}


def smallest_budget(model: Any, prompt_ids: list[int]) -> float:
    """The cheapest plan's budget for this prompt (``CostModel.min_budget``: no scheduled unit), counted before token
    selection, which cannot be known before the image is seen (PruMerge keeps a number per image); generate
    raises a budget to the minimum after selection."""
    seq_len = len(prompt_ids) + int(model.planner.uses_latency_token)
    return model.scheduler.cost.min_budget(seq_len) if model.scheduler is not None else 1.0


def budget_that_ran(asked: float, ran: float) -> float:
    """The budget a request ran at: as asked (not its float32), unless generate raised it to the minimum."""
    return ran if ran > float(torch.tensor(asked, dtype=torch.float32)) else asked


def collate(requests: list[ChatRequest], pad_token_id: int, device: torch.device, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Prompts left-padded (generation appends at one column for the whole batch), images stacked."""
    length = max(len(request.prompt_ids) for request in requests)
    ids = torch.full((len(requests), length), pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(requests), length), dtype=torch.long)
    for row, request in enumerate(requests):
        ids[row, length - len(request.prompt_ids) :] = torch.tensor(request.prompt_ids)
        mask[row, length - len(request.prompt_ids) :] = 1
    pixels = torch.stack([request.pixel_values for request in requests]).to(device, dtype)
    return {"prompt_ids": ids.to(device), "prompt_attention_mask": mask.to(device), "pixel_values": pixels}


def _now(device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


def read_metrics(path: str) -> dict[str, Any]:
    """The worker's latest counts ({} before the first write, or where none can be read: the worker's writes are
    best-effort, and an unreadable path must not make /metrics a 500)."""
    try:
        return json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError):
        return {}




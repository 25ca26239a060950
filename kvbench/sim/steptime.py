"""How long a simulated step takes: priced by the costs (the default), or a public formula.

`profile`: the recompute cost model prices prefill chunks incrementally (a chunk of c tokens after
x cached ones costs recompute_ms(x + c) - recompute_ms(x)), the decode model prices the B
requests that generate one token (d0 + d1·B + d2·B·T at mean context T); both add up.

`constant:20ms` and `linear:10ms+0.01ms/token`: a fixed time per step plus a time per scheduled
token, whatever the tokens are. These make a schedule reproducible against any other engine
driven by the same clock (the differential test against vLLM uses `constant`).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np

from kvbench.costmodel import CostModel, DecodeModel
from kvbench.errors import KvbenchError
from kvbench.limits import MAX_COST_MS, MAX_TOKENS
from kvbench.models import ModelSpec

_LINEAR = re.compile(r"^linear:(?P<fixed>[0-9.eE+-]+)ms\+(?P<per_token>[0-9.eE+-]+)ms/token$")
_CONSTANT = re.compile(r"^constant:(?P<fixed>[0-9.eE+-]+)ms$")
STEP_TIME_FORMS = "profile, constant:<ms>ms or linear:<ms>ms+<ms>ms/token"


@dataclass(frozen=True)
class CostStepTime:
    """A step costs its prefill chunks plus its decode batch (plus `fixed_ms`, 0 here)."""

    costs: CostModel
    decode: DecodeModel
    fixed_ms: float = 0.0

    def prefill_ms(self, start: np.ndarray, end: np.ndarray) -> np.ndarray:
        both = self.costs.recompute_ms(np.concatenate([end, start]))  # one pricing of both
        return both[:end.size] - both[end.size:]

    def decode_ms(self, num_decode: int, mean_context: float) -> float:
        return float(self.decode.step_ms(num_decode, mean_context))

    def decode_steps_ms(self, batch: int, mean_contexts: np.ndarray) -> np.ndarray:
        """Consecutive decode-only steps of `batch` requests at these mean contexts."""
        return self.decode.step_ms(batch, mean_contexts)


@dataclass(frozen=True)
class LinearStepTime:
    fixed_ms: float
    ms_per_token: float

    def prefill_ms(self, start: np.ndarray, end: np.ndarray) -> np.ndarray:
        return self.ms_per_token * (end - start)

    def decode_ms(self, num_decode: int, mean_context: float) -> float:
        return self.ms_per_token * num_decode

    def decode_steps_ms(self, batch: int, mean_contexts: np.ndarray) -> np.ndarray:
        return np.full(np.shape(mean_contexts), self.fixed_ms + self.ms_per_token * batch)


def parse_step_time(text: str) -> LinearStepTime | None:
    """`constant:20ms` or `linear:10ms+0.01ms/token`; None for `profile` (priced by the costs:
    `CostStepTime`); ValueError otherwise."""
    if text == "profile":
        return None
    match = _CONSTANT.match(text) or _LINEAR.match(text)
    if match is None:
        raise KvbenchError(f"step time {text!r}: write it as {STEP_TIME_FORMS}")
    try:
        fixed, per_token = float(match["fixed"]), float(match.groupdict().get("per_token") or 0)
    except ValueError:
        raise KvbenchError(f"step time {text!r}: not a number; write it as {STEP_TIME_FORMS}"
                         ) from None
    if not (np.isfinite(fixed) and np.isfinite(per_token)) or fixed < 0 or per_token < 0:
        raise KvbenchError(f"step time {text!r}: times must be finite and non-negative")
    if fixed + per_token * MAX_TOKENS > MAX_COST_MS:
        raise KvbenchError(f"step time {text!r}: a step of {MAX_TOKENS} tokens would take more "
                         f"than {MAX_COST_MS:g} ms")
    if fixed == 0 and per_token == 0:
        raise KvbenchError(f"step time {text!r}: a step must take some time")
    return LinearStepTime(fixed, per_token)


@dataclass(frozen=True)
class StepPricer:
    """The one pricing of a step, scheduled one by one or in a run of decode steps: its time
    (`time`: one of the forms above) and its FLOPs (`ModelSpec`)."""

    time: CostStepTime | LinearStepTime
    model: ModelSpec

    def step(self, start: np.ndarray, end: np.ndarray, prefill_start: np.ndarray | None,
             prefill_end: np.ndarray | None, num_tokens: int, samples: np.ndarray,
             decode: np.ndarray, num_decode: int, transfer_ms: float) -> tuple[float, float]:
        """Time (ms, after `transfer_ms` of swaps) and FLOPs of a step that computes positions
        [start, end) of its requests (`num_tokens` in all); `samples`: those that sample a
        token, `decode`: the `num_decode` generating one token (priced by the decode model), the
        others prefill chunks [prefill_start, prefill_end) (None when there are none)."""
        step_ms = transfer_ms
        if prefill_start is not None:
            step_ms += float(self.time.prefill_ms(prefill_start, prefill_end).sum())
        if num_decode:  # mean context: an exact integer sum over the count, as numpy's mean
            context = end if num_decode == end.size else end[decode]
            step_ms += self.time.decode_ms(num_decode, int(context.sum()) / num_decode)
        step_ms += self.time.fixed_ms
        flops = self.model.step_flops(num_tokens,
                                      int((end * end - start * start).sum()),
                                      int(np.count_nonzero(samples)))
        return step_ms, flops

    def decode_run(self, batch: int, context_tokens: int, num_steps: int) -> np.ndarray:
        """Times (ms) of up to `num_steps` consecutive decode steps of `batch` requests that
        hold `context_tokens` in all before the first."""
        means = (context_tokens + batch * np.arange(1, num_steps + 1)) / batch
        return self.time.decode_steps_ms(batch, means)

    def decode_run_flops(self, batch: int, context_tokens: int, num_steps: int) -> float:
        """FLOPs of the first `num_steps` steps of such a run."""
        return self.model.decode_run_flops(batch, num_steps, context_tokens)

    def recompute_ms(self, start: np.ndarray, end: np.ndarray) -> float:
        """The prefill time of recomputing positions [start, end)."""
        return float(self.time.prefill_ms(start, end).sum())

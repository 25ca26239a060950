"""What a simulation is given: the replica's limits and policies by name (`SimConfig`), and the
costs that price its steps (`SimCosts`)."""

from __future__ import annotations

import dataclasses
import difflib
import inspect
from dataclasses import dataclass

import numpy as np

from kvbench.costmodel import CostModel, DecodeModel
from kvbench.hardware import get_hardware
from kvbench.limits import (
    MAX_BLOCKS,
    MAX_COST_MS,
    MAX_MEMORY_GIB,
    MAX_TOKENS,
    check_finite,
    check_name,
)
from kvbench.models import ModelSpec, get_model
from kvbench.profile import Profile
from kvbench.sim.engines import ENGINES, RULE_FIELDS, EngineRules
from kvbench.sim.policies import ADMISSION, PREEMPTIONS, VICTIMS
from kvbench.sim.predictors import PREDICTORS
from kvbench.sim.steptime import parse_step_time

MAX_NOISE_SIGMA = 10.0  # a log-normal factor of e^10 (22,000) either way is noise enough

REGISTRIES = {"admission": ADMISSION, "victim": VICTIMS, "preemption": PREEMPTIONS,
              "predictor": PREDICTORS}


@dataclass(frozen=True)
class SimConfig:
    """Policies by name, the replica's limits, and the policies' knobs."""

    admission: str = "fcfs"
    victim: str = "lifo"
    preemption: str = "recompute"
    predictor: str = "oracle"
    model: str = "llama-2-7b"  # for the analytic profile when none is given
    hardware: str = "h100-sxm"
    block_size: int = 16
    gpu_blocks: int | None = None
    gpu_memory_gib: float | None = None  # default: the hardware preset's memory_gib
    gpu_memory_utilization: float = 0.9
    cpu_swap_gib: float = 4.0
    cpu_swap_blocks: int | None = None  # overrides cpu_swap_gib
    engine: str = "vllm-0.32"  # scheduling rules (sim/engines.py); the fields below override
    max_num_seqs: int | None = None
    max_num_batched_tokens: int | None = None
    full_prompt_admission: bool | None = None
    prefix_caching: bool | None = None
    async_scheduling: bool | None = None
    null_block: bool | None = None
    watermark: float | None = None
    max_model_len: int | None = None  # None: no limit (vLLM: the model's context length)
    chunked_prefill: bool = True
    headroom_fraction: float = 0.0  # future-kv
    long_output_tokens: int = 512  # future-kv
    max_long_requests: int | None = None  # future-kv
    protect_steps: int = 4  # cost-aware
    noise_sigma: float = 0.5  # noisy
    history_quantile: float = 0.5  # history
    history_window: int = 1000  # history
    step_time: str = "profile"  # or constant:20ms, linear:10ms+0.01ms/token (sim/steptime.py)
    livelock_steps: int = 10_000
    seed: int = 0

    def __post_init__(self) -> None:
        for axis, registry in REGISTRIES.items():
            name = check_name(axis, getattr(self, axis))
            if name not in registry:
                hint = difflib.get_close_matches(str(name), registry, n=1)
                raise ValueError(f"unknown {axis} {'' if axis == 'predictor' else 'policy '}"
                                 f"{name!r}"
                                 + (f" (did you mean {hint[0]!r}?)" if hint else "")
                                 + f"; choose from {', '.join(registry)}")
        if self.engine not in ENGINES:
            raise ValueError(f"unknown engine {self.engine!r}; choose from {', '.join(ENGINES)}")
        for field in ("block_size", "history_window", "livelock_steps", "long_output_tokens"):
            check_int(field, getattr(self, field), 1, MAX_TOKENS)
        for field, low, high in (("gpu_blocks", 1, MAX_BLOCKS), ("cpu_swap_blocks", 0, MAX_BLOCKS),
                                 ("max_long_requests", 0, MAX_BLOCKS),
                                 ("max_num_seqs", 1, MAX_TOKENS),
                                 ("max_num_batched_tokens", 1, MAX_TOKENS),
                                 ("max_model_len", 1, MAX_TOKENS)):
            if getattr(self, field) is not None:
                check_int(field, getattr(self, field), low, high)
        if self.watermark is not None:
            check_finite("watermark", self.watermark, low=0, high=0.99)
        check_int("protect_steps", self.protect_steps, 0, MAX_TOKENS)
        if self.gpu_memory_gib is not None:
            check_finite("gpu_memory_gib", self.gpu_memory_gib, positive=True,
                         high=MAX_MEMORY_GIB)
        check_finite("cpu_swap_gib", self.cpu_swap_gib, low=0, high=MAX_MEMORY_GIB)
        check_finite("noise_sigma", self.noise_sigma, low=0, high=MAX_NOISE_SIGMA)
        for field in ("gpu_memory_utilization", "history_quantile"):
            if not 0 < check_finite(field, getattr(self, field), high=1):
                raise ValueError(f"{field} must be in (0, 1], got {getattr(self, field)}")
        parse_step_time(self.step_time)
        if not 0 <= check_finite("headroom_fraction", self.headroom_fraction) < 1:
            raise ValueError(f"headroom_fraction must be in [0, 1), got {self.headroom_fraction}")

    @property
    def rules(self) -> EngineRules:
        """The engine's rules with this config's overrides."""
        given = {f: getattr(self, f) for f in RULE_FIELDS if getattr(self, f) is not None}
        return dataclasses.replace(ENGINES[self.engine], **given)

    @property
    def policy_name(self) -> str:
        """admission/victim/preemption/predictor, and @engine unless it is the default's."""
        engine = "" if self.engine == SimConfig.engine else f"@{self.engine}"
        return f"{self.admission}/{self.victim}/{self.preemption}/{self.predictor}{engine}"

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def knobs(self, fn) -> dict:
        """The fields that a policy or predictor takes as keyword arguments, by name."""
        return {name: getattr(self, name) for name in inspect.signature(fn).parameters
                if name in SIM_CONFIG_FIELDS}


def check_int(name: str, value, low: int, high: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) \
            or not low <= value <= high:
        raise ValueError(f"{name} must be an integer from {low} to {high}, got {value!r}")
    return int(value)


SIM_CONFIG_FIELDS = frozenset(f.name for f in dataclasses.fields(SimConfig))


@dataclass(frozen=True)
class SimCosts:
    """The model and the coefficients that price a simulation's steps, from a profile or from
    datasheet figures (`source`: 'measured' or 'analytic')."""

    model: ModelSpec
    costs: CostModel
    decode: DecodeModel
    source: str

    def __post_init__(self) -> None:
        """Costs that price any request (up to MAX_TOKENS) below MAX_COST_MS: a run's clock, a
        sum of such steps, stays finite."""
        n = MAX_TOKENS
        for what, ms in (("swap", self.costs.swap_ms(n)), ("recompute", self.costs.recompute_ms(n)),
                         ("decode", self.decode.step_ms(n, n))):
            if not ms <= MAX_COST_MS:
                raise ValueError(f"{self.source} costs: a {what} of {n} tokens costs {ms:.3g} ms, "
                                 f"beyond {MAX_COST_MS:g} ms: the coefficients are out of range")

    @classmethod
    def from_profile(cls, profile: Profile, hardware: str = "h100-sxm") -> SimCosts:
        """A profile's costs; a profile without a decode fit gets the analytic one for
        `hardware`."""
        model = profile.model.spec()
        decode = profile.decode_model() or DecodeModel.analytic(model, get_hardware(hardware))
        return cls(model, profile.cost_model(), decode, profile.source)

    @classmethod
    def analytic(cls, model: str | ModelSpec, hardware: str = "h100-sxm",
                 block_size: int = 16) -> SimCosts:
        spec = get_model(model) if isinstance(model, str) else model
        hw = get_hardware(hardware)
        return cls(spec, CostModel.analytic(spec, hw, block_size), DecodeModel.analytic(spec, hw),
                   "analytic")

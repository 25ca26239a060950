"""What a simulation is given: the policy, the replica and the knobs (`SimConfig`), and the
costs that price its steps (`Costs`, resolved once for the selector, the simulator and the
vLLM plugin alike)."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from kvbench.costmodel import CostModel, DecodeModel
from kvbench.errors import KvbenchError
from kvbench.fields import option
from kvbench.hardware import fingerprint_mismatch, get_hardware
from kvbench.limits import MAX_COST_MS, MAX_TOKENS, check_int
from kvbench.models import SHAPE_FIELDS, ModelSpec, get_model
from kvbench.profile import Profile, load
from kvbench.sim.engines import FIELDS as REPLICA_FIELDS
from kvbench.sim.engines import ReplicaSpec
from kvbench.sim.policies import KNOB_FIELDS, POLICY_AXES, Knobs, PolicySpec
from kvbench.sim.steptime import parse_step_time

DEFAULT_MODEL = "llama-2-7b"  # analytic costs when no profile or model is given
RUN_FIELDS = ("step_time", "livelock_steps", "decode_runs")


@dataclass(frozen=True)
class SimConfig:
    """A simulation's policy, replica and knobs, and how its steps are run.

    `decode_runs` (on by default) applies runs of plain decode steps at once, with the same
    arithmetic and block allocations as one by one (kvbench/sim/engine.py); off, every step is
    scheduled one by one, the reference the fast path is tested against."""

    policy: PolicySpec = PolicySpec()
    replica: ReplicaSpec = ReplicaSpec()
    knobs: Knobs = Knobs()
    step_time: str = option("profile", "profile, constant:20ms or linear:10ms+0.01ms/token.")
    livelock_steps: int = option(10_000, "Stop when no token comes for this many steps.")
    decode_runs: bool = option(True, "Apply runs of plain decode steps at once (same result).")

    def __post_init__(self) -> None:
        check_int("livelock_steps", self.livelock_steps, 1, MAX_TOKENS)
        parse_step_time(self.step_time)
        if self.policy.engine is not None:  # `...@engine` picks the replica's rules
            object.__setattr__(self, "replica", self.replica.with_engine(self.policy.engine))
            object.__setattr__(self, "policy", dataclasses.replace(self.policy, engine=None))

    @classmethod
    def build(cls, policy: str | PolicySpec = PolicySpec(), **settings) -> SimConfig:
        """From a policy and flat settings (see `replace`)."""
        return cls(PolicySpec.parse(policy) if isinstance(policy, str) else policy
                   ).replace(**settings)

    def replace(self, engine: str | None = None, **settings) -> SimConfig:
        """This config with flat settings changed, each an axis of `PolicySpec` (admission,
        victim, ...) or a field of `ReplicaSpec`, `Knobs` or this class (None: unchanged);
        `engine` first swaps the replica's named engine. An unknown name is an error, never
        ignored."""
        given = {k: v for k, v in settings.items() if v is not None}
        unknown = sorted(set(given) - set(POLICY_AXES) - set(REPLICA_FIELDS) - set(KNOB_FIELDS)
                         - set(RUN_FIELDS))
        if unknown:
            known = (*POLICY_AXES, *REPLICA_FIELDS, *KNOB_FIELDS, *RUN_FIELDS)
            raise KvbenchError(f"unknown setting {unknown[0]!r}; known: {', '.join(known)}")
        pick = lambda names: {k: v for k, v in given.items() if k in names}  # noqa: E731
        replica = self.replica.with_engine(engine) if engine else self.replica
        return dataclasses.replace(
            self, policy=dataclasses.replace(self.policy, **pick(POLICY_AXES)),
            replica=dataclasses.replace(replica, **pick(REPLICA_FIELDS)),
            knobs=dataclasses.replace(self.knobs, **pick(KNOB_FIELDS)), **pick(RUN_FIELDS))

    def with_policy(self, policy: str | PolicySpec) -> SimConfig:
        return dataclasses.replace(
            self, policy=PolicySpec.parse(policy) if isinstance(policy, str) else policy)

    @property
    def policy_name(self) -> str:
        """admission/victim/preemption/predictor, and @engine unless it is the default's."""
        engine = None if self.replica.engine == ReplicaSpec.engine else self.replica.engine
        return dataclasses.replace(self.policy, engine=engine).name

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class Costs:
    """The model and the coefficients that price preemptions and steps, from a profile or from
    datasheet figures (`source`: 'measured' or 'analytic', with the profile's path)."""

    model: ModelSpec
    costs: CostModel
    decode: DecodeModel
    source: str

    def __post_init__(self) -> None:
        """Costs that price any request (up to MAX_TOKENS) below MAX_COST_MS: a run's clock, a
        sum of such steps, stays finite."""
        n = MAX_TOKENS
        with np.errstate(over="ignore", invalid="ignore"):  # inf and NaN are refused below
            priced = (("swap", self.costs.swap_ms(n)), ("recompute", self.costs.recompute_ms(n)),
                      ("decode", self.decode.step_ms(n, n)))
        for what, ms in priced:
            if not ms <= MAX_COST_MS:
                raise KvbenchError(f"{self.source} costs: a {what} of {n} tokens costs "
                                   f"{ms:.3g} ms, beyond {MAX_COST_MS:g} ms: the coefficients "
                                   "are out of range")

    @classmethod
    def from_profile(cls, profile: Profile, hardware: str = "h100-sxm") -> Costs:
        """A profile's costs; a profile without a decode fit gets the analytic one for
        `hardware`."""
        model = profile.model.spec()
        decode = profile.decode_model() or DecodeModel.analytic(model, get_hardware(hardware))
        return cls(model, profile.cost_model(), decode, profile.source)

    @classmethod
    def analytic(cls, model: str | ModelSpec = DEFAULT_MODEL, hardware: str = "h100-sxm",
                 block_size: int = 16) -> Costs:
        spec = get_model(model) if isinstance(model, str) else model
        hw = get_hardware(hardware)
        return cls(spec, CostModel.analytic(spec, hw, block_size), DecodeModel.analytic(spec, hw),
                   "analytic")

    @classmethod
    def resolve(cls, profile: str | None = None, model: str | ModelSpec | None = None,
                hardware: str = "h100-sxm", block_size: int = 16,
                warn: Callable[[str], None] = lambda line: None) -> Costs:
        """The costs a command or the plugin prices with: the profile at `profile` (its model
        must have `model`'s shape when both are given; `warn` gets one line when it was
        measured on other hardware than this machine's, one when it is a version 1 file, its
        swap split evenly between out and in), else analytic costs of `model`
        (default `DEFAULT_MODEL`) on `hardware`."""
        if profile is None:
            return cls.analytic(DEFAULT_MODEL if model is None else model, hardware, block_size)
        prof = load(profile, warn)
        costs = cls.from_profile(prof, hardware)
        if model is not None:
            wanted = get_model(model) if isinstance(model, str) else model
            differ = [f for f in SHAPE_FIELDS if getattr(costs.model, f) != getattr(wanted, f)]
            if differ:
                raise KvbenchError(
                    f"profile {profile} is for {costs.model.name} ({differ[0]} "
                    f"{getattr(costs.model, differ[0])}), the served model has {differ[0]} "
                    f"{getattr(wanted, differ[0])}; calibrate for this model")
        if warning := fingerprint_mismatch(prof.environment):
            warn(warning)
        return costs

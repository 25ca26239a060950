"""The profile: fitted swap/recompute (and decode) coefficients with their provenance, as JSON.

Schema `kvbench.profile`, version 2: swap-out and swap-in fitted apart (sections `swap_out` and
`swap_in`, beside `recompute`; `swap` holds what they share: block size and copy impl). `load`
validates and reports one line per problem; it rejects other schemas and newer versions. A
version 1 file (one `swap` section fitted to the round trip) still loads: each of its swap
coefficients, and each measured latency, is split evenly between out and in, and `warn` gets one
line saying so. `save` writes atomically (temp file, fsync, rename), so an interrupted write
never leaves a partial file or destroys the previous one.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, ClassVar, Literal

import numpy as np
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from kvbench import __version__
from kvbench.console import stderr_warning
from kvbench.costmodel import COEFFICIENT_KEYS, CostModel, DecodeModel
from kvbench.errors import KvbenchError
from kvbench.hardware import HardwareSpec, get_hardware
from kvbench.io import write_atomic
from kvbench.limits import MAX_TOKENS
from kvbench.models import ModelSpec, get_model

SCHEMA = "kvbench.profile"
SCHEMA_VERSION = 2
NonNeg = Field(ge=0, allow_inf_nan=False)
DECODE_KEYS = {f.name for f in dataclasses.fields(DecodeModel)}


class ProfileError(KvbenchError):
    """A profile that cannot be read or used; the message says which file and field."""


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", protected_namespaces=())


class FitQuality(Strict):
    r2: float | None = None  # of the fit's own (relative-error) objective
    r2_unweighted: float | None = None
    heldout_mape: float | None = Field(default=None, ge=0)  # a fraction: 0.05 is 5%
    min_tokens: int = Field(ge=0)
    max_tokens: int = Field(ge=0)
    method: str = "analytic"


class Measurements(Strict):
    """Raw samples: one median latency per point, with the spread and whether it was held out."""

    num_tokens: list[int] = []
    latency_ms: list[float] = []
    spread_ms: list[float] = []
    heldout: list[bool] = []


class CostSection(Strict):
    """One phase's share of the `CostModel`: each key is the CostModel field name without the
    phase's prefix (`fixed_ms` in `swap_out` is `swap_out_fixed_ms`), with the fit that produced
    it."""

    PHASE: ClassVar[str]
    fit: FitQuality
    measurements: Measurements = Measurements()

    @classmethod
    def _key(cls, field: str) -> str:
        return field.removeprefix(f"{cls.PHASE}_")

    def coefficients(self) -> dict[str, float]:
        """This section's CostModel fields, under their CostModel names."""
        return {f: getattr(self, self._key(f)) for f in COEFFICIENT_KEYS
                if self._key(f) in type(self).model_fields}

    @classmethod
    def from_costs(cls, costs: CostModel, **rest: Any) -> CostSection:
        """This phase's coefficients out of `costs`, plus the other fields in `rest`."""
        return cls(**{cls._key(f): v for f, v in costs.to_dict().items()
                      if cls._key(f) in cls.model_fields}, **rest)


class SwapSection(Strict):
    """What swap-out and swap-in share: the KV block size they copy (the `CostModel` field) and
    the copy impl that was timed (None for analytic costs)."""

    block_size: int = Field(ge=1)
    impl: str | None = None


class TransferSection(CostSection):
    """One direction of a swap: fixed_ms + ms_per_token·n + ms_per_block·ceil(n/block_size)."""

    fixed_ms: float = NonNeg
    ms_per_token: float = NonNeg
    ms_per_block: float = NonNeg


class SwapOutSection(TransferSection):
    PHASE: ClassVar[str] = "swap_out"


class SwapInSection(TransferSection):
    PHASE: ClassVar[str] = "swap_in"


class RoundTripSection(TransferSection):
    """Version 1's `swap` section: the round trip, fitted as one (read only, by `upgrade_v1`)."""

    PHASE: ClassVar[str] = "swap"
    block_size: int = Field(ge=1)
    impl: str | None = None


class RecomputeSection(CostSection):
    PHASE: ClassVar[str] = "recompute"
    fixed_ms: float = NonNeg
    ms_per_token: float = NonNeg
    ms_per_token_sq: float = NonNeg


class DecodeSection(Strict):
    d0_ms: float = NonNeg
    d1_ms_per_seq: float = NonNeg
    d2_ms_per_seq_token: float = NonNeg
    r2: float | None = None
    heldout_mape: float | None = None


class ModelInfo(Strict):
    name: str
    num_layers: int = Field(ge=1)
    hidden_size: int = Field(ge=1)
    num_heads: int = Field(ge=1)
    num_kv_heads: int = Field(ge=1)
    head_dim: int = Field(ge=1)
    intermediate_size: int = Field(ge=1)
    vocab_size: int = Field(ge=1)
    dtype: str
    tp: int = Field(default=1, ge=1)

    @model_validator(mode="after")
    def _consistent(self) -> ModelInfo:
        self.spec()  # the shape rules of ModelSpec (heads a multiple of KV heads, the dtype)
        return self

    def spec(self) -> ModelSpec:
        return ModelSpec(**self.model_dump())


class Profile(Strict):
    schema_: Literal["kvbench.profile"] = Field(default=SCHEMA, alias="schema")
    schema_version: Literal[2] = SCHEMA_VERSION
    created_at: str
    kvbench_version: str
    source: Literal["analytic", "measured"]
    dtype: str
    environment: dict[str, Any]
    model: ModelInfo
    config: dict[str, Any] = {}
    swap: SwapSection
    swap_out: SwapOutSection
    swap_in: SwapInSection
    recompute: RecomputeSection
    decode: DecodeSection | None = None
    crossover_tokens: int | None = Field(default=None, ge=1)
    extra: dict[str, Any] = {}

    model_config = ConfigDict(extra="forbid", populate_by_name=True, protected_namespaces=())

    @field_validator("created_at")
    @classmethod
    def _iso_time(cls, value: str) -> str:
        datetime.fromisoformat(value)
        return value

    def cost_model(self) -> CostModel:
        return CostModel(block_size=self.swap.block_size, **self.swap_out.coefficients(),
                         **self.swap_in.coefficients(), **self.recompute.coefficients())

    def fits(self) -> dict[str, FitQuality]:
        """Each fitted phase's fit quality, by the phase's `CostModel` prefix."""
        return {"swap_out": self.swap_out.fit, "swap_in": self.swap_in.fit,
                "recompute": self.recompute.fit}

    def decode_model(self) -> DecodeModel | None:
        if self.decode is None:
            return None
        return DecodeModel(**self.decode.model_dump(include=DECODE_KEYS))

    def check_matches(self, model: str | None = None, device: str | None = None,
                      force: bool = False) -> None:
        """Refuse a profile measured for another model or device, unless forced."""
        if force:
            return
        if model is not None and model != self.model.name:
            raise ProfileError(f"profile is for model {self.model.name!r}, not {model!r}; "
                               "calibrate for that model or pass --force")
        measured_on = self.environment.get("device")
        if device is not None and self.source == "measured" and device != measured_on:
            raise ProfileError(f"profile was measured on {measured_on} "
                               f"({self.environment.get('device_name')}), not {device}; "
                               "calibrate on this device or pass --force")

    def to_json(self) -> str:
        return json.dumps(self.model_dump(mode="json", by_alias=True), indent=2, allow_nan=False)


def now_iso() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def analytic_profile(model: ModelSpec, hw: HardwareSpec, block_size: int = 16,
                     max_tokens: int = 131072) -> Profile:
    """A profile computed from datasheet figures, not measured (source 'analytic')."""
    if isinstance(block_size, bool) or not isinstance(block_size, int) \
            or not 1 <= block_size <= MAX_TOKENS:
        raise KvbenchError(f"block_size must be a positive integer up to {MAX_TOKENS} (tokens per "
                         f"KV block), got {block_size!r}")
    costs = CostModel.analytic(model, hw, block_size)
    decode = DecodeModel.analytic(model, hw)
    fit = FitQuality(min_tokens=1, max_tokens=max_tokens)
    return Profile(
        created_at=now_iso(), kvbench_version=__version__, source="analytic", dtype=model.dtype,
        environment={"device": "analytic", "device_name": hw.name},
        model=ModelInfo(**model.to_dict()), config={"hardware": dataclasses.asdict(hw)},
        swap=SwapSection(block_size=costs.block_size),
        swap_out=SwapOutSection.from_costs(costs, fit=fit),
        swap_in=SwapInSection.from_costs(costs, fit=fit),
        recompute=RecomputeSection.from_costs(costs, fit=fit),
        decode=DecodeSection(**dataclasses.asdict(decode)),
        crossover_tokens=costs.crossover_tokens(),
    )


def problems(exc: ValidationError) -> str:
    """A pydantic error's problems on one line: `where: what; where: what`."""
    lines = []
    for err in exc.errors():
        where = ".".join(str(p) for p in err["loc"]) or "(top level)"
        lines.append(f"{where}: {err['msg']}")
    return "; ".join(lines)


class V1Swap(BaseModel):
    """Of a version 1 profile, the section `upgrade_v1` rewrites (the rest is checked as v2's)."""

    swap: RoundTripSection


V1_SPLIT = "v1 round trip split evenly"


def upgrade_v1(data: dict) -> dict:
    """A version 1 profile's JSON as version 2: its round-trip `swap` section becomes `swap_out`
    and `swap_in`, each with half of every coefficient and of every measured latency and spread
    (so `CostModel.swap_ms` is the v1 round trip, bit for bit), the fit quality as it was, its
    method marked `V1_SPLIT`. Raises ValidationError for a malformed v1 `swap` section."""
    swap = V1Swap.model_validate(data).swap
    m = swap.measurements
    half = {"fixed_ms": swap.fixed_ms / 2, "ms_per_token": swap.ms_per_token / 2,
            "ms_per_block": swap.ms_per_block / 2,
            "fit": {**swap.fit.model_dump(), "method": f"{swap.fit.method}; {V1_SPLIT}"},
            "measurements": {**m.model_dump(),
                             "latency_ms": (np.asarray(m.latency_ms, np.float64) / 2).tolist(),
                             "spread_ms": (np.asarray(m.spread_ms, np.float64) / 2).tolist()}}
    return {**data, "schema_version": 2,
            "swap": {"block_size": swap.block_size, "impl": swap.impl},
            "swap_out": half, "swap_in": half}


def parse(data: Any, origin: str = "profile",
          warn: Callable[[str], None] = stderr_warning) -> Profile:
    """Validate a decoded JSON object as a profile; a version 1 object is upgraded
    (`upgrade_v1`) and `warn` gets one line saying so, naming `origin`."""
    if not isinstance(data, dict):
        raise ProfileError(f"{origin}: expected a JSON object, got {type(data).__name__}")
    schema = data.get("schema")
    if schema != SCHEMA:
        raise ProfileError(f"{origin}: not a kvbench profile (schema is {schema!r}, "
                           f"expected {SCHEMA!r})")
    version = data.get("schema_version")
    if isinstance(version, bool) or not isinstance(version, int):
        raise ProfileError(f"{origin}: schema_version must be an integer, got {version!r}")
    if version > SCHEMA_VERSION:
        raise ProfileError(f"{origin}: schema_version {version} is newer than this kvbench "
                           f"understands ({SCHEMA_VERSION}); upgrade kvbench")
    if version < 1:
        raise ProfileError(f"{origin}: unknown schema_version {version}")
    try:
        if version == 1:
            data = upgrade_v1(data)
        profile = Profile.model_validate(data)
    except ValidationError as exc:
        raise ProfileError(f"{origin}: {problems(exc)}") from None
    if version == 1:
        warn(f"{origin}: schema_version 1 profile: its round-trip swap fit is split evenly "
             "between swap_out and swap_in; calibrate again to fit each direction")
    return profile


def load(path: str | os.PathLike, warn: Callable[[str], None] = stderr_warning) -> Profile:
    """The profile in the JSON file at `path` (see `parse`; `warn` gets its one line)."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ProfileError(f"cannot read profile {path}: {exc.strerror or exc}") from None
    except UnicodeDecodeError as exc:
        raise ProfileError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    try:
        data = json.loads(text, parse_constant=lambda c: math.nan)
    except json.JSONDecodeError as exc:
        raise ProfileError(f"{path}: not valid JSON ({exc.msg} at line {exc.lineno})") from None
    except RecursionError:
        raise ProfileError(f"{path}: not valid JSON for a profile (nested too deeply)") from None
    return parse(data, origin=str(path), warn=warn)


def save(profile: Profile, path: str | os.PathLike) -> Path:
    return write_atomic(path, profile.to_json() + "\n")


def resolve(path: str | os.PathLike | None, model: str | None, hardware: str = "h100-sxm",
            block_size: int | None = None, dtype: str | None = None, tp: int | None = None,
            force: bool = False, **hw_overrides) -> Profile:
    """The profile a command prices with: the file at `path` (checked against `model` when both
    are given), or an analytic one for a model preset on a hardware preset. `block_size`
    (default 16), `dtype`, `tp` (default 1) and `hw_overrides` (hardware fields) shape analytic
    costs only: None means not given, and giving one with `path` is an error."""
    if path is not None:
        shape = {"block_size": block_size, "dtype": dtype, "tp": tp, **hw_overrides}
        given = [k for k, v in shape.items() if v is not None]
        if given:
            raise KvbenchError(f"--{given[0].replace('_', '-')} sets analytic costs (--model "
                             "without --profile); a profile carries its own measured costs")
        prof = load(path)
        prof.check_matches(model=model, force=force)
        return prof
    if model is None:
        raise KvbenchError("give --profile PATH or --model NAME (see `kvbench models`)")
    return analytic_profile(get_model(model, dtype=dtype, tp=1 if tp is None else tp),
                            get_hardware(hardware, **hw_overrides),
                            block_size=16 if block_size is None else block_size)


def extrapolation_warning(profile: Profile, token_counts: list[int]) -> str | None:
    """Why costs for these token counts are guesses: the largest lies beyond the lengths the
    profile's fits were measured on (None if all lie within)."""
    valid_max = max(fit.max_tokens for fit in profile.fits().values())
    if token_counts and max(token_counts) > valid_max:
        return (f"{max(token_counts)} tokens is beyond the profile's measured range (up to "
                f"{valid_max}); costs there are extrapolated")
    return None


# --- summaries: `kvbench profile show`, the `calibrate` summary and the results page ----------

def round_trip_ceiling_gbps(profile: Profile) -> float | None:
    """The contiguous-copy ceiling of a swap round trip: both directions' bytes over the sum of
    their times, i.e. the harmonic mean of the two one-way ceilings (None if not measured)."""
    ceiling = profile.extra.get("ceiling_gbps")
    return 2 / (1 / ceiling["out"] + 1 / ceiling["in"]) if ceiling else None


def formula_lines(profile: Profile) -> tuple[str, str, str, str, str | None]:
    """The models, one line each: the swap round trip (the sum the selector prices), the fitted
    swap-out, swap-in, recompute and (if present) decode models."""
    r, d, block_size = profile.recompute, profile.decode, profile.swap.block_size
    decode = (f"decode_step_ms(B, T) = {d.d0_ms:.6g} + {d.d1_ms_per_seq:.6g}·B + "
              f"{d.d2_ms_per_seq_token:.6g}·B·T" if d else None)
    out, back = (f"{s.PHASE}_ms(n) = {s.fixed_ms:.6g} + {s.ms_per_token:.6g}·n + "
                 f"{s.ms_per_block:.6g}·ceil(n/{block_size})"
                 for s in (profile.swap_out, profile.swap_in))
    return ("swap_ms(n) = swap_out_ms(n) + swap_in_ms(n)", out, back,
            f"recompute_ms(n) = {r.fixed_ms:.6g} + {r.ms_per_token:.6g}·n + "
            f"{r.ms_per_token_sq:.6g}·n²", decode)


def fit_line(name: str, fit: FitQuality) -> str:
    r2 = "n/a" if fit.r2 is None else f"{fit.r2:.4f}"
    if fit.r2_unweighted is not None:
        r2 += f" (unweighted {fit.r2_unweighted:.4f})"
    mape = "n/a" if fit.heldout_mape is None else f"{100 * fit.heldout_mape:.1f}%"
    return (f"{name}: R² {r2}, held-out error {mape}, valid {fit.min_tokens}-{fit.max_tokens} "
            f"tokens ({fit.method})")


def crossover_line(profile: Profile) -> str:
    crossover = profile.crossover_tokens
    return f"crossover_tokens: {crossover if crossover else 'none (recompute always cheaper)'}"


def summary_lines(profile: Profile, path: str | os.PathLike) -> list[str]:
    """`kvbench profile show`: provenance, coefficients, fit quality, crossover."""
    env, impl = profile.environment, profile.swap.impl
    swap, swap_out, swap_in, recompute, decode = formula_lines(profile)
    return [
        f"profile: {path}",
        f"source: {profile.source}, created {profile.created_at}, "
        f"kvbench {profile.kvbench_version}",
        f"device: {env.get('device_name')} (commit {env.get('commit')}, torch "
        f"{env.get('torch')}, triton {env.get('triton')})",
        f"model: {profile.model.name}, {profile.dtype}, tp={profile.model.tp}, "
        f"{profile.model.spec().kv_bytes_per_token:,.0f} KV bytes/token",
        swap + (f"  [impl {impl}]" if impl else ""),
        swap_out,
        swap_in,
        recompute,
        *([decode] if decode else []),
        *(fit_line(f"{phase} fit", fit) for phase, fit in profile.fits().items()),
        crossover_line(profile),
    ]

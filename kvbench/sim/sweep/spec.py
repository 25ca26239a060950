"""A sweep's spec: the axes (lists) and the settings every cell shares, read from TOML or YAML."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated, TypeVar

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    NonNegativeInt,
    PositiveFloat,
    PositiveInt,
    ValidationError,
    model_validator,
)

from kvbench.errors import KvbenchError
from kvbench.sim.policies import PolicySpec
from kvbench.sim.run import RunSpec
from kvbench.sim.study import STUDY_POLICIES
from kvbench.sim.workloads import parse_synthetic_spec, spec_trace

if sys.version_info >= (3, 11):
    import tomllib
else:
    import tomli as tomllib


class SweepError(KvbenchError):
    """A spec that cannot be run; the message names the file and the field."""


def _distinct(values: list) -> list:
    repeated = [v for i, v in enumerate(values) if v in values[:i]]
    if repeated:
        raise KvbenchError(f"{repeated[0]!r} appears twice")
    return values


def _policy(text: str) -> str:
    PolicySpec.parse(text)
    return text


def _synthetic(text: str) -> str:
    parse_synthetic_spec(text)
    return text


T = TypeVar("T")
Axis = Annotated[list[T], AfterValidator(_distinct)]  # an axis of the sweep: distinct values


class SweepSpec(BaseModel):
    """The axes (lists), and the settings every cell shares: any option of `kvbench simulate`
    by its name (`RunSpec.from_options`: the replica's vLLM settings, the knobs, the costs' and
    workloads' sources); see `kvbench.sim.sweep`."""

    model_config = ConfigDict(extra="allow", frozen=True)

    policies: Axis[Annotated[str, AfterValidator(_policy)]] = Field(
        default=list(STUDY_POLICIES), min_length=1)
    traces: Axis[Path] = []  # CSV paths, or bundled traces' names (`BUNDLED_TRACES`)
    synthetic: Axis[Annotated[str, AfterValidator(_synthetic)]] = []
    rate_scales: Axis[PositiveFloat] = Field(default=[1.0], min_length=1)
    num_gpu_blocks: Axis[PositiveInt] = []  # empty: sized from the GPU's memory
    seeds: Axis[NonNegativeInt] = Field(default=[0], min_length=1)

    @model_validator(mode="after")
    def _check(self) -> SweepSpec:
        if not self.traces and not self.synthetic:
            raise KvbenchError("give at least one workload: traces = [CSV paths] or synthetic = "
                             "[mixes such as 'requests=400,rate=20']")
        axes = {"trace", "synthetic", "rate_scale", "seed", "policy", "num_gpu_blocks"}
        if given := sorted(axes & set(self.settings)):
            raise KvbenchError(f"{given[0]} is an axis here: write it as a list of the plural name")
        self.run_spec()
        return self

    @property
    def settings(self) -> dict:
        """The settings every cell shares, by option name."""
        return dict(self.model_extra or {})

    def run_spec(self) -> RunSpec:
        return RunSpec.from_options(**self.settings)


def load_spec(path: str | Path) -> SweepSpec:
    """Read and validate a TOML (.toml) or YAML (.yaml, .yml) spec; paths in it are relative to
    its folder, and a trace that names no file there may be a bundled trace's name."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as exc:
        raise SweepError(f"cannot read sweep spec {path}: {exc.strerror or exc}") from None
    if path.suffix == ".toml":
        try:
            data = tomllib.loads(text)
        except tomllib.TOMLDecodeError as exc:
            raise SweepError(f"{path}: not valid TOML ({exc})") from None
    elif path.suffix in (".yaml", ".yml"):
        try:
            import yaml
        except ImportError:
            raise SweepError(f"{path}: YAML specs need PyYAML (pip install 'kvbench[ray]'), "
                             "or write the spec in TOML") from None
        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            raise SweepError(f"{path}: not valid YAML ({exc})".replace("\n", " ")) from None
    else:
        raise SweepError(f"{path}: a sweep spec is a .toml, .yaml or .yml file")
    if not isinstance(data, dict):
        raise SweepError(f"{path}: expected a table of settings, got {type(data).__name__}")
    base = path.parent
    if isinstance(data.get("profile"), str):
        data["profile"] = str(base / data["profile"])
    if isinstance(data.get("traces"), list):
        data["traces"] = [spec_trace(v, base) if isinstance(v, str) else v
                          for v in data["traces"]]
    try:
        return SweepSpec.model_validate(data)
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(str(p) for p in e['loc']) or 'spec'}: "
                             f"{e['msg'].removeprefix('Value error, ')}" for e in exc.errors())
        raise SweepError(f"{path}: {problems}") from None

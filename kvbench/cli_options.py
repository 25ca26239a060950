"""Command-line options generated from the spec dataclasses, as vLLM's EngineArgs does: one
flag per field that carries a help line (`kvbench.fields.option`), named after the field
(`--max-num-seqs`), in a help panel per spec. A generated option defaults to None, "not given":
the spec's own default (or the named engine's) applies, so `RunSpec.from_options` and
`SimConfig.replace` take exactly what the user typed.
"""

from __future__ import annotations

import dataclasses
import inspect
import types
import typing
from typing import Optional

import typer

from kvbench.sim.config import SimConfig
from kvbench.sim.engines import ReplicaSpec
from kvbench.sim.policies import Knobs, PolicySpec
from kvbench.sim.run import CostSource, WorkloadSource

# (spec, help panel, fields left out): the groups `kvbench simulate` takes.
WORKLOAD = (WorkloadSource, "Workload", ())
COSTS = (CostSource, "Costs", ())
POLICY = (PolicySpec, "Policy", ())
REPLICA = (ReplicaSpec, "Replica (vLLM's settings)", ())
KNOBS = (Knobs, "Policy knobs", ())
RUN = (SimConfig, "Run", ())


def _scalar(annotation) -> type:
    """int for `int | None`, and so on."""
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    if isinstance(annotation, types.UnionType) or typing.get_origin(annotation) is typing.Union:
        return args[0]
    return annotation


def spec_parameters(spec: type, panel: str, skip: tuple[str, ...] = ()
                    ) -> list[inspect.Parameter]:
    hints = typing.get_type_hints(spec)
    params = []
    for field in dataclasses.fields(spec):
        if field.name in skip or "help" not in field.metadata:
            continue
        kind = _scalar(hints[field.name])
        kind = str if kind is not bool and kind not in (int, float) else kind
        flag = field.name.replace("_", "-")
        decls = [f"--{flag}/--no-{flag}"] if kind is bool else [f"--{flag}"]
        shown = "" if field.default is None else f" [default: {field.default}]"
        params.append(inspect.Parameter(
            field.name, inspect.Parameter.KEYWORD_ONLY, annotation=Optional[kind],
            default=typer.Option(None, *decls, help=field.metadata["help"] + shown,
                                 rich_help_panel=panel, show_default=False)))
    return params


def with_options(*groups):
    """Decorator: the command takes, besides its own parameters, one keyword option per field
    of each group's spec (its `**options`)."""
    def wrap(command):
        signature = inspect.signature(command)
        own = [p for p in signature.parameters.values() if p.kind != p.VAR_KEYWORD]
        names = {p.name for p in own}
        extra = {}
        for group in groups:
            for param in spec_parameters(*group):
                if param.name not in names:
                    extra.setdefault(param.name, param)
        command.__signature__ = signature.replace(parameters=[*own, *extra.values()])
        return command
    return wrap


def given(options: dict) -> dict:
    """The options the user typed (generated options default to None)."""
    return {k: v for k, v in options.items() if v is not None}

"""`option`: a dataclass field that carries its help line. The CLI generates a flag per field of
the spec dataclasses (`ReplicaSpec`, `Knobs`, `PolicySpec`, a run's sources) from it, as vLLM's
EngineArgs does, so a setting is declared once, with its help, where it is used."""

from __future__ import annotations

import dataclasses


def option(default, help: str):  # noqa: A002 (the word every CLI library uses)
    return dataclasses.field(default=default, metadata={"help": help})

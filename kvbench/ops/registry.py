"""Implementations of an op, registered by name: `{name: Impl}` per op (COPY_IMPLS,
ATTENTION_IMPLS). Adding one is a function plus an entry; its keyword-only parameters are the
options the op passes through, and `unavailable` says where it cannot run."""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch

from kvbench.errors import KvbenchError


def _everywhere(device: torch.device) -> str | None:
    return None


@dataclass(frozen=True)
class Impl:
    """run(...) does the op's work; unavailable(device) is why it cannot run on `device`
    (None: it can)."""

    run: Callable[..., None]
    unavailable: Callable[[torch.device], str | None] = _everywhere

    @property
    def options(self) -> tuple[str, ...]:
        """The keyword options `run` takes (its keyword-only parameters)."""
        return tuple(p.name for p in inspect.signature(self.run).parameters.values()
                     if p.kind is p.KEYWORD_ONLY)


def available(registry: Mapping[str, Impl], device: torch.device | str) -> tuple[str, ...]:
    """The names in `registry` that run on `device`."""
    device = torch.device(device)
    return tuple(name for name, impl in registry.items() if impl.unavailable(device) is None)


def choose(registry: Mapping[str, Impl], impl: str, auto: Callable[[torch.device], str],
           device: torch.device, options: dict) -> tuple[str, Impl, dict]:
    """The impl to run for `impl` (by the rule `auto` when "auto") on `device`, and the options
    given (None counts as not given). ValueError, naming what is wrong, for an unknown impl, an
    option it does not take, or a device it cannot run on."""
    options = {key: value for key, value in options.items() if value is not None}
    name = auto(device) if impl == "auto" else impl
    if name not in registry:
        raise KvbenchError(f"unknown impl {impl!r}; use one of {', '.join(registry)}, auto")
    chosen = registry[name]
    unknown = sorted(set(options) - set(chosen.options))
    if unknown:
        takers = [n for n, i in registry.items() if set(unknown) <= set(i.options)]
        chose = f" (what impl='auto' runs on {device.type})" if impl == "auto" else ""
        if takers:
            raise KvbenchError(f"{', '.join(unknown)} only apply to impl="
                             f"{' or '.join(map(repr, takers))}, not {name!r}{chose}")
        raise KvbenchError(f"impl={name!r}{chose} takes no option {', '.join(unknown)}; its "
                         f"options: {', '.join(chosen.options) or 'none'}")
    reason = chosen.unavailable(device)
    if reason is not None:
        raise KvbenchError(reason)
    return name, chosen, options

"""The command line's consoles, shared by kvbench/cli.py and kvbench/cli_sim.py: results on
stdout (`out`, 160 columns when piped), progress, warnings and errors on stderr (`err`)."""

from __future__ import annotations

import sys

from rich.console import Console

out = Console(soft_wrap=True, markup=False, highlight=False,
              width=None if sys.stdout.isatty() else 160)
err = Console(stderr=True, soft_wrap=True, markup=False, highlight=False)


def echo(lines: list[str]) -> None:
    out.print("\n".join(lines))


def stderr_warning(line: str) -> None:
    """One `warning:` line on stderr: what the library's `warn` callbacks print by default (a
    trace column that is ignored, a profile read from an older schema)."""
    print(f"warning: {line}", file=sys.stderr)

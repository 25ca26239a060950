"""python -m kvbench.vllm.conformance: vLLM's own unit tests with kvbench swapped in."""

from __future__ import annotations

from pathlib import Path

import typer

from kvbench.errors import KvbenchError
from kvbench.vllm.conformance.run import VARIANTS, run

app = typer.Typer(add_completion=False)


@app.command()
def main(variant: list[str] = typer.Option(list(VARIANTS), help="variants to run (plain vLLM "
                                           "always runs first)"),
         out: Path | None = typer.Option(None, help="write the judged outcomes here (JSON)")
         ) -> None:
    """Run vLLM 0.32's scheduler, async-scheduler and KV connector unit tests on plain vLLM
    and with kvbench's scheduler per variant; exit 1 on any problem."""
    unknown = [v for v in variant if v not in VARIANTS]
    if unknown:
        typer.echo(f"error: unknown variant {unknown[0]!r}; known: {', '.join(VARIANTS)}",
                   err=True)
        raise typer.Exit(2)
    try:
        report = run(variant, out)
    except KvbenchError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from None
    problems = 0
    for name, result in report["variants"].items():
        counts = ", ".join(f"{v} {k}" for k, v in result["counts"].items())
        differ = len(result["fails_where_vllm_passes"])
        typer.echo(f"{name:12s} {counts}; {differ} fail where vLLM passes; "
                   f"{len(result['problems'])} problems")
        for line in result["problems"]:
            typer.echo(f"error: {name}: {line}", err=True)
        problems += len(result["problems"])
    typer.echo(f"{report['wall_s']:.0f} s")
    if problems:
        raise typer.Exit(1)


if __name__ == "__main__":
    app()

"""`python -m kvbench.compile_gate`: run the gate for each target in its own process (Triton
keeps one target per process; two targets use two cores), write the JSON results and
README.md under --out, print any failure and exit 1 on one."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import typer

from kvbench.io import write_atomic

app = typer.Typer(add_completion=False, help=__doc__)


def _worker_env(cache: Path) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # compile for real
    env["TRITON_CACHE_DIR"] = str(cache.resolve())
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # Triton 3.9's default, without its warning
    return env


def _run_workers(archs: list[int], survey: bool, cache: Path) -> list[dict]:
    """One `--worker` process per target, in parallel; their JSON results in `archs` order."""
    procs = [subprocess.Popen([sys.executable, "-m", "kvbench.compile_gate", "--worker",
                               str(arch)] + (["--survey"] if survey else []),
                              stdout=subprocess.PIPE, env=_worker_env(cache), text=True)
             for arch in archs]
    outputs = [proc.communicate()[0] for proc in procs]
    for arch, proc in zip(archs, procs):
        if proc.returncode:
            raise SystemExit(f"compile gate: the sm_{arch} worker failed (exit {proc.returncode})")
    return [json.loads(out) for out in outputs]


def _load(out: Path, prefix: str, archs) -> list[dict]:
    return [json.loads(p.read_text()) for arch in archs
            if (p := out / f"{prefix}sm{arch}.json").exists()]


@app.command()
def main(arch: list[int] = typer.Option([90, 80], help="compute capabilities to compile for"),
         survey: bool = typer.Option(False, help="compile the attention candidates instead"),
         out: Path = typer.Option(Path("results/compile-gate"), help="results directory"),
         cache: Path = typer.Option(Path(".cache/compile-gate"),
                                    help="Triton's kernel cache, kept between runs"),
         worker: int = typer.Option(0, hidden=True)) -> None:
    if worker:
        from kvbench.compile_gate.driver import TARGETS, install
        from kvbench.compile_gate.gate import run_gate
        from kvbench.compile_gate.survey import run_survey

        def progress(text: str) -> None:
            print(f"sm_{worker}: {text}", file=sys.stderr, flush=True)

        target = TARGETS[worker]
        driver = install(target)  # this process's one target: Triton keeps one per process
        print(json.dumps((run_survey if survey else run_gate)(target, driver, progress)))
        return
    from kvbench.compile_gate import report

    start = time.perf_counter()
    results = _run_workers(arch, survey, cache)
    prefix = "candidates-" if survey else ""
    out.mkdir(parents=True, exist_ok=True)
    for result in results:
        write_atomic(out / f"{prefix}{result['target'].replace('_', '')}.json",
                     json.dumps(result, indent=1) + "\n")
    archs = sorted({90, 80} | set(arch), reverse=True)
    write_atomic(out / "README.md", report.markdown(_load(out, "", archs),
                                                    _load(out, "candidates-", archs)))
    seconds = time.perf_counter() - start
    if survey:
        for result in results:
            for key, config in result["picks"].items():
                print(f"{result['target']} {key}: {config}")
        print(f"survey: {sum(len(r['kernels']) for r in results)} kernels in {seconds:.0f} s")
        return
    problems = [line for result in results for line in report.failures(result)]
    for line in problems:
        print(f"FAIL {line}")
    kernels = sum(len(r["kernels"]) for r in results)
    print(f"compile gate: {kernels} compiled kernels for "
          f"{', '.join(r['target'] for r in results)} in {seconds:.0f} s: "
          f"{len(problems)} failure(s); compile only, nothing ran on a GPU")
    if problems:
        raise typer.Exit(1)


if __name__ == "__main__":
    app()

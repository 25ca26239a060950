"""Run-to-run stability of `kvbench calibrate`, judged by what a user relies on.

    python benchmarks/stability.py                 # 5 x `kvbench calibrate --device cpu --quick`
    python benchmarks/stability.py --runs 3 --model tiny -- --block-size 32

Each run is a fresh `kvbench calibrate ... --force --out <tmp>/run<i>.json` (--force: a run
that misses the quality bar is kept for the statistics); a run that fails ends the script.
Printed: per run the wall time, the load average before it and each fit's held-out error; then,
for each number (held-out errors, coefficients, predicted costs at a few lengths, and the machine
check's reference workload before and after each run: a fixed matrix product, whose spread is
the machine's own), the spread over the runs as (max - min) / median; at the end a verdict per
criterion of `kvbench.calibration.stability`: (a) every held-out error at most 10%, (b) the
selector's decision the same in every run at 64 lengths inside the measured range, (c) the
predicted costs there within 10% across runs once divided by the run's reference workload. A
script, not a test: it measures this machine, which may be shared (the load column says how
busy it was).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from kvbench.calibration.stability import fitted_phases, run_row
from kvbench.hardware import fingerprint
from kvbench.io import write_atomic
from kvbench.report import stability_markdown


def run_once(out: Path, model: str | None, extra: list[str]) -> dict:
    command = [sys.executable, "-m", "kvbench.cli", "calibrate", "--device", "cpu", "--quick",
               "--force", "--json", "--out", str(out), *(["--model", model] if model else []),
               *extra]
    load = os.getloadavg()[0]
    start = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True)
    wall_s = time.perf_counter() - start
    if done.returncode != 0:
        sys.exit(f"run failed (exit {done.returncode}): {done.stderr.strip().splitlines()[-1]}")
    return {"wall_s": wall_s, "load_before": load, "exit": done.returncode,
            **run_row(json.loads(done.stdout))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--model", default=None, help="default: calibrate's (qwen2.5-0.5b)")
    parser.add_argument("--save", type=Path, help="also write the runs as JSON (`kvbench report` "
                        "renders a *-stability.json into README)")
    parser.add_argument("extra", nargs="*", help="more `kvbench calibrate` options, after --")
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(args.runs):
            rows.append(run_once(Path(tmp) / f"run{i}.json", args.model, args.extra))
            r = rows[-1]
            heldout = ", ".join(f"{phase} {100 * r[f'{phase}_heldout']:.1f}%"
                                for phase in fitted_phases(r))
            print(f"run {i + 1}: {r['wall_s']:.0f} s, load {r['load_before']:.2f} before; "
                  f"held-out {heldout}", flush=True)
    data = {"command": " ".join(["kvbench calibrate --device cpu --quick",
                                 *(["--model", args.model] if args.model else []), *args.extra]),
            "machine": fingerprint("cpu"), "runs": rows}
    print("\n" + "\n".join(stability_markdown(data)))
    if args.save:
        write_atomic(args.save, json.dumps(data, indent=1))


if __name__ == "__main__":
    main()

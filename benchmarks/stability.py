"""Run-to-run stability of `kvbench calibrate`: the same command N times, the spread of its fits.

    python benchmarks/stability.py                 # 5 x `kvbench calibrate --device cpu --quick`
    python benchmarks/stability.py --runs 3 --model tiny -- --block-size 32

Each run is a fresh `kvbench calibrate ... --force --out <tmp>/run<i>.json` (--force: a run
that misses the quality bar is kept for the statistics). Printed: per run the wall time, the
load average before it, the exit code, both held-out errors and the coefficients; then, for each
number, the spread over the runs as (max - min) / median, and the predicted swap and recompute
costs at a few lengths (the fits' split between coefficients can move while their predictions
agree), and the machine check's reference workload before and after each run (a fixed matrix
product: its spread is the machine's own, which no fit can remove). The issue-13 goal is
checked at the end: every held-out error <= 10% and every coefficient's spread <= 10%. A
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

from kvbench.hardware import fingerprint
from kvbench.io import write_atomic
from kvbench.report import STABILITY_COEFFICIENTS as COEFFICIENTS
from kvbench.report import stability_markdown

PREDICT_AT = (64, 1024, 8192)


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
    profile = json.loads(done.stdout)
    row = {"wall_s": wall_s, "load_before": load, "exit": done.returncode}
    for phase, keys in COEFFICIENTS.items():
        row[f"{phase}_heldout"] = profile[phase]["fit"]["heldout_mape"]
        row.update({f"{phase}.{k}": profile[phase][k] for k in keys})
    from kvbench.profile import parse

    costs = parse(profile).cost_model()
    for n in PREDICT_AT:
        row[f"swap_ms({n})"] = float(costs.swap_ms(n))
        row[f"recompute_ms({n})"] = float(costs.recompute_ms(n))
    machine = profile["extra"]["machine"]
    for when in ("before", "after"):
        row[f"machine.{when}.reference_ms"] = machine[when]["reference_ms"]
    return row


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
            print(f"run {i + 1}: {r['wall_s']:.0f} s, load {r['load_before']:.2f} before; "
                  f"held-out swap {100 * r['swap_heldout']:.1f}%, recompute "
                  f"{100 * r['recompute_heldout']:.1f}%", flush=True)
    data = {"command": " ".join(["kvbench calibrate --device cpu --quick",
                                 *(["--model", args.model] if args.model else []), *args.extra]),
            "machine": fingerprint("cpu"), "runs": rows}
    print("\n" + "\n".join(stability_markdown(data)))
    if args.save:
        write_atomic(args.save, json.dumps(data, indent=1))


if __name__ == "__main__":
    main()

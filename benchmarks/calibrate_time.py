"""Wall time of `kvbench calibrate` against its time plan, as a newcomer runs it: a fresh process,
stderr to a log file (not a terminal), the default model and dtype.

    python benchmarks/calibrate_time.py --save results/calibrate-time/<slug>.json
    python benchmarks/calibrate_time.py --avx2-only --save ...   # the same, oneDNN, MKL and
                                                                  # ATen held to AVX2
    python benchmarks/calibrate_time.py --default-path ...  # profiles where `make calibrate`
                                                            # writes them (the full one stays)

`--avx2-only` reproduces a CPU without AVX-512 or native bfloat16 on one that has them
(`AVX2_ONLY_ENV`): oneDNN, MKL and ATen's kernels are held to AVX2, which makes bfloat16 products
emulated as on an AVX2-only AMD EPYC (checked: the runs' dtype line must say so). It restricts the
instruction set, not the clock or the caches: such a CPU may be slower still, which the time plan
measures in its probes. Each run records the wall time, the dtype and plan lines it printed, how
many plain progress lines the log holds, and the profile's planned and measured phase seconds;
`--save` appends the runs to a JSON file that `kvbench report` renders into README.
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

AVX2_ONLY_ENV = {"ONEDNN_MAX_CPU_ISA": "AVX2", "MKL_ENABLE_INSTRUCTIONS": "AVX2",
                 "ATEN_CPU_CAPABILITY": "avx2"}


def run_once(quick: bool, env: dict[str, str], tmp: Path, default_path: bool) -> dict:
    """One `kvbench calibrate`; `default_path`: exactly the newcomer's command, its profile at
    the default path (the committed one), else --force and a profile in `tmp`."""
    out = tmp / f"{'quick' if quick else 'full'}.json"
    command = ["kvbench", "calibrate", "--device", "cpu", *(["--quick"] if quick else [])]
    shown = " ".join([*(f"{k}={v}" for k, v in env.items()), *command])
    if not default_path:
        command += ["--force", "--out", str(out)]
    log = tmp / "stderr.log"
    start = time.perf_counter()
    with open(log, "w") as stderr, open(tmp / "stdout.log", "w") as stdout:
        done = subprocess.run([sys.executable, "-m", "kvbench.cli", *command[1:]],
                              stdout=stdout, stderr=stderr, env={**os.environ, **env})
    wall_s = time.perf_counter() - start
    lines = log.read_text().splitlines()
    if done.returncode != 0:
        sys.exit(f"run failed (exit {done.returncode}): {lines[-1] if lines else ''}")
    if default_path:
        out = Path((tmp / "stdout.log").read_text().split()[1])  # "profile: PATH  (...)"
    extra = json.loads(out.read_text())["extra"]
    return {"command": shown, "quick": quick, "wall_s": wall_s,
            "budget_s": extra["time_plan"]["budget_s"],
            "planned_s": extra["time_plan"]["estimate_s"],
            "measured_s": extra["phase_seconds"],
            "dtype": extra["dtype_choice"]["dtype"],
            "printed": [line for line in lines if line.startswith(("dtype:", "plan:"))],
            "progress_lines": sum(line.startswith("calibrate: ") for line in lines)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--avx2-only", action="store_true", help="hold the kernels to AVX2")
    parser.add_argument("--modes", default="quick,full", help="quick, full or both")
    parser.add_argument("--save", type=Path, help="append the runs to this JSON file")
    parser.add_argument("--default-path", action="store_true", help="write each profile where "
                        "`kvbench calibrate` does (the last run's stays), without --force")
    args = parser.parse_args()
    env = AVX2_ONLY_ENV if args.avx2_only else {}
    runs = []
    with tempfile.TemporaryDirectory() as tmp:
        for mode in args.modes.split(","):
            runs.append(run_once(mode == "quick", env, Path(tmp), args.default_path))
            r = runs[-1]
            print(f"{r['command']}: {r['wall_s']:.0f} s wall (target {r['budget_s']:.0f} s), dtype "
                  f"{r['dtype']}, {r['progress_lines']} progress lines", flush=True)
    if args.save:
        data = json.loads(args.save.read_text()) if args.save.exists() else {
            "machine": fingerprint("cpu"), "runs": []}
        data["runs"] += runs
        write_atomic(args.save, json.dumps(data, indent=1))


if __name__ == "__main__":
    main()

"""How long CI takes: `.ci/run` on a fresh clone, each of its steps timed as it runs.

    python benchmarks/ci_time.py --avx2-only --save results/ci-time/<slug>.json

The clone is of this repository's HEAD (commit what is to be timed first), with `shared/` beside
it as CI has it. Bash's trace stamps every command of `.ci/run` with the time it starts (`PS4`
carries `$EPOCHREALTIME`), so the steps are timed inside the one real run. `--avx2-only`
holds oneDNN, MKL and ATen to AVX2 (benchmarks/calibrate_time.py's `AVX2_ONLY_ENV`), as on a CPU
without AVX-512 or native bfloat16. `--save` writes the steps as JSON, which `kvbench report`
renders into README.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from calibrate_time import AVX2_ONLY_ENV

from kvbench.hardware import fingerprint
from kvbench.io import write_atomic

ROOT = Path(__file__).resolve().parents[1]
STEP = re.compile(r"^\++ (\d+\.\d+) (make .+)$")  # `++`: a command of the sourced script


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--avx2-only", action="store_true", help="hold the kernels to AVX2")
    parser.add_argument("--save", type=Path, help="write the steps' times to this JSON file")
    args = parser.parse_args()
    env = AVX2_ONLY_ENV if args.avx2_only else {}
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, text=True,
                            capture_output=True, check=True).stdout.strip()
    with tempfile.TemporaryDirectory() as tmp:
        clone = Path(tmp) / "main"
        subprocess.run(["git", "clone", "-q", str(ROOT), str(clone)], check=True)
        if (ROOT.parent / "shared").is_dir():
            (Path(tmp) / "shared").symlink_to(ROOT.parent / "shared")
        log = Path(tmp) / "ci.log"
        start = time.time()
        with open(log, "w") as out:
            # bash takes no PS4 from the environment when run as root: set it, then source
            # the script with its own name as $0 (its `cd "$(dirname "$0")/.."` needs it).
            done = subprocess.run(["bash", "-c", "PS4='+ $EPOCHREALTIME '; set -x; . .ci/run",
                                   ".ci/run"], cwd=clone, stdout=out, stderr=subprocess.STDOUT,
                                  env={**os.environ, **env, "CI": "true"})
        end = time.time()
        starts = [(float(m[1]), m[2]) for line in log.read_text().splitlines()
                  if (m := STEP.match(line))]
        if done.returncode != 0:
            sys.exit(f".ci/run failed (exit {done.returncode}); its log: "
                     f"{log.read_text()[-2000:]}")
    steps = [{"step": step, "seconds": (starts[i + 1][0] if i + 1 < len(starts) else end) - t}
             for i, (t, step) in enumerate(starts)]
    data = {"command": " ".join([*(f"{k}={v}" for k, v in env.items()), "CI=true",
                                 "bash .ci/run"]),
            "commit": commit, "machine": fingerprint("cpu"), "total_s": end - start,
            "steps": steps}
    for s in steps:
        print(f"{s['step']}: {s['seconds']:.0f} s")
    print(f"total: {data['total_s'] / 60:.1f} min")
    if args.save:
        write_atomic(args.save, json.dumps(data, indent=1))


if __name__ == "__main__":
    main()

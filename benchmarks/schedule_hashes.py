"""Hashes of the step log and summary of every study policy on three workloads: the Azure
conversation trace with analytic H100 costs at the study's load, the same trace at 0.015x with
the committed CPU profile and 1000 blocks, and a synthetic mix. A refactor that must not change
any schedule compares its hashes with those taken before it:

    python benchmarks/schedule_hashes.py --out before.json            # at the old commit
    python benchmarks/schedule_hashes.py --compare before.json        # at the new one

`--no-decode-runs` schedules every step one by one (much slower on the whole trace).
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import sys
from pathlib import Path

import numpy as np

from kvbench.sim.engine import Simulator
from kvbench.sim.metrics import summarize
from kvbench.sim.run import RunSpec
from kvbench.sim.study import STUDY_POLICIES

ROOT = Path(__file__).resolve().parents[1]
PROFILE = ROOT / "results/profiles/cpu-amd-epyc-f25m17s1-avx512bf16-2c-qwen2-5-0-5b.json"
CASES = {
    "h100": {},
    "cpu": {"profile": str(PROFILE), "rate_scale": 0.015, "num_gpu_blocks": 1000},
    "synth": {"synthetic": "requests=600,rate=40,long-prompt=0.3,long-output=0.3",
              "num_gpu_blocks": 900},
}


def digest(value) -> str:
    return hashlib.sha256(value).hexdigest()[:16]


def hashes(decode_runs: bool) -> dict[str, dict]:
    out = {}
    for name, options in CASES.items():
        run = RunSpec.from_options(decode_runs=decode_runs, **options)
        workload, config, costs = run.resolve(study_default=True)
        for policy in STUDY_POLICIES:
            result = Simulator(workload, config.with_policy(policy), costs, record=True).run()
            log = result.step_log
            parts = [np.ascontiguousarray(v).tobytes() if isinstance(v, np.ndarray)
                     else str(v).encode() for v in dataclasses.astuple(log)]
            summary = json.dumps(summarize(result), sort_keys=True, default=str).encode()
            out[f"{name}:{policy}"] = {"log": digest(b"".join(parts)),
                                       "summary": digest(summary), "steps": log.num_steps}
            print(name, policy, out[f"{name}:{policy}"], file=sys.stderr)
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, help="write the hashes here (JSON)")
    parser.add_argument("--compare", type=Path, help="hashes taken before: exit 1 on a change")
    parser.add_argument("--no-decode-runs", action="store_true")
    args = parser.parse_args()
    now = hashes(decode_runs=not args.no_decode_runs)
    if args.out:
        args.out.write_text(json.dumps(now, indent=1) + "\n")
    if args.compare:
        before = json.loads(args.compare.read_text())
        changed = sorted(k for k in before if now.get(k) != before[k])
        print(f"{len(before)} cases, {len(changed)} changed" + (f": {changed}" if changed else ""))
        return 1 if changed else 0
    return 0


if __name__ == "__main__":
    sys.exit(main())

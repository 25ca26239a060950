"""What the CPU swap copy's cost per token does with size, and why: a script, not a test.

    python benchmarks/swap_per_token.py [--seconds 120]

The `torch` copy impl's two calls (`index_select` out, `index_copy_` in, on the cache's flat
[layers·2, blocks, block row] view) for requests of 16 to 65,536 tokens at qwen2.5-0.5b's KV shape
(a 4 KiB block row), under every combination of: torch threads (1, 2) and the request's host
buffer cold (rotated through 512 MiB, as the calibration does) or warm (one buffer). All the
conditions are measured in shuffled rounds for a fixed time, so load and drift spread over them
alike. Printed: median µs per token per condition, the interquartile range in % and the minor
page faults taken inside the timed calls. The load average during the run is printed first: on a
busy machine the two-thread rows measure the wait for a descheduled thread.
"""

from __future__ import annotations

import argparse
import itertools
import os
import resource
import time

import numpy as np
import torch

LAYERS_KV, BLOCK_ROW = 48, 16 * 2 * 64  # qwen2.5-0.5b: 24 layers x K/V; 16 tokens x 2 heads x 64
SIZES = (16, 64, 256, 1024, 4096, 16384, 65536)
COLD_BYTES = 512 * 2**20


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=120.0)
    args = parser.parse_args()
    pool_blocks = 2 * max(SIZES) // 16
    cache = torch.randn(LAYERS_KV, pool_blocks, BLOCK_ROW, dtype=torch.bfloat16)
    host = torch.empty(LAYERS_KV * pool_blocks // 2 * BLOCK_ROW, dtype=torch.bfloat16)
    host.fill_(1)  # faulted in before any timing
    gen = torch.Generator().manual_seed(0)

    def requests(num_tokens: int, warm: bool):
        blocks = -(-num_tokens // 16)
        numel = LAYERS_KV * blocks * BLOCK_ROW
        rotate = 1 if warm else int(np.clip(COLD_BYTES / (2 * numel), 8, 256))
        offsets = np.linspace(0, host.numel() - numel, rotate).astype(np.int64).tolist()
        return itertools.cycle([(torch.randperm(pool_blocks, generator=gen)[:blocks],
                                 host[o:o + numel].view(LAYERS_KV, blocks, BLOCK_ROW))
                                for o in offsets])

    conditions = [(d, n, t, w) for d in ("out", "in") for n in SIZES for t in (1, 2)
                  for w in (False, True)]
    turns = {c: requests(c[1], c[3]) for c in conditions}
    samples = {c: [] for c in conditions}
    faults = dict.fromkeys(conditions, 0)

    def call(condition) -> float:
        direction, _, threads, _ = condition
        torch.set_num_threads(threads)
        ids, buffer = next(turns[condition])
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        start = time.perf_counter()
        if direction == "out":
            torch.index_select(cache, 1, ids, out=buffer)
        else:
            cache.index_copy_(1, ids, buffer)
        elapsed = time.perf_counter() - start
        faults[condition] += resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
        return elapsed

    for condition in conditions:  # warm-up, not counted
        call(condition)
    faults.update(dict.fromkeys(conditions, 0))
    rng, loads = np.random.default_rng(0), []
    deadline = time.time() + args.seconds
    while time.time() < deadline:
        for i in rng.permutation(len(conditions)).tolist():
            samples[conditions[i]].append(call(conditions[i]))
        loads.append(os.getloadavg()[0])
    print(f"{len(samples[conditions[0]])} rounds; load average {min(loads):.1f}-{max(loads):.1f} "
          f"on {os.cpu_count()} cores")
    print(f"µs per token at {', '.join(map(str, SIZES))} tokens  |  IQR %  |  page faults")
    for direction, threads, warm in itertools.product(("out", "in"), (1, 2), (False, True)):
        rows = [np.array(samples[(direction, n, threads, warm)]) for n in SIZES]
        per_token = " ".join(f"{1e6 * np.median(r) / n:7.2f}" for r, n in zip(rows, SIZES))
        iqr = " ".join(f"{100 * np.subtract(*np.percentile(r, [75, 25])) / np.median(r):3.0f}"
                       for r in rows)
        taken = sum(faults[(direction, n, threads, warm)] for n in SIZES)
        print(f"{direction:3} {threads} thread{'s' if threads > 1 else ' '} "
              f"{'warm' if warm else 'cold'}: {per_token}  |  {iqr}  |  {taken}")


if __name__ == "__main__":
    main()

"""Token ids for a workload, so that prefix-cache hits come from real block contents.

Prefix caching matches full KV blocks by a hash chained over every token before and in the
block, so a hit needs the same token ids in the same places. Prompts are random (seeded) unless
given; each request generates one token id over and over (`output_token`), drawn per request so
two requests with the same prompt still generate different blocks, as sampled text would.
"""

from __future__ import annotations

import numpy as np

from kvbench.sim.workloads import TokenIds, Workload

VOCAB_SIZE = 32000  # the tiny model config's vocabulary (kvbench/vllm/tiny_llama)


def workload_token_ids(workload: Workload, seed: int = 0, vocab_size: int = VOCAB_SIZE
                       ) -> TokenIds:
    """The workload's own token ids (a trace that carries them), else `random_token_ids`."""
    if workload.tokens is not None:
        return workload.tokens
    return random_token_ids(workload, seed, vocab_size)


def hashed_tokens(keys: np.ndarray, vocab_size: int = VOCAB_SIZE) -> np.ndarray:
    """A token id in [1, vocab_size) for each uint64 key, the same for the same key
    (SplitMix64's finalizer: keys that differ in one bit give unrelated ids)."""
    with np.errstate(over="ignore"):
        z = keys.astype(np.uint64) + np.uint64(0x9E3779B97F4A7C15)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        z ^= z >> np.uint64(31)
    return (z % np.uint64(vocab_size - 1) + np.uint64(1)).astype(np.int32)


def random_token_ids(workload: Workload, seed: int = 0, vocab_size: int = VOCAB_SIZE) -> TokenIds:
    """Uniform token ids in [1, vocab_size) for every prompt and output, seeded."""
    rng = np.random.default_rng(seed)
    offsets = np.concatenate([[0], np.cumsum(workload.prompt_tokens)])
    flat = rng.integers(1, vocab_size, size=int(offsets[-1]), dtype=np.int32)
    output_token = rng.integers(1, vocab_size, size=workload.num_requests, dtype=np.int32)
    return TokenIds(offsets, flat, output_token)

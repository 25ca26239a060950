"""JSONL traces whose requests share prefixes (kvbench.sim.jsonl_traces): Mooncake's format,
token ids inline, and one error line naming the line for bad input."""

from __future__ import annotations

import json

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kvbench.sim.jsonl_traces import MOONCAKE_BLOCK_TOKENS, mooncake_tokens
from kvbench.sim.workloads import WorkloadError, read_trace


def write(tmp_path, rows, name="t.jsonl"):
    path = tmp_path / name
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def mooncake(timestamp, length, ids, output=4):
    return {"timestamp": timestamp, "input_length": length, "output_length": output,
            "hash_ids": ids}


def test_mooncake_requests_share_exactly_the_blocks_their_hash_ids_share(tmp_path):
    path = write(tmp_path, [mooncake(0, 1100, [0, 1, 2]), mooncake(250, 1024, [0, 1]),
                            mooncake(500, 700, [0, 7]), mooncake(1000, 300, [9])])
    w = read_trace(path)
    assert w.prompt_tokens.tolist() == [1100, 1024, 700, 300]
    assert w.arrival_s.tolist() == [0.0, 0.25, 0.5, 1.0]
    p = [w.tokens.prompt(i) for i in range(4)]
    assert np.array_equal(p[0][:1024], p[1])  # ids 0, 1 in common
    assert np.array_equal(p[0][:512], p[2][:512])  # id 0
    assert not np.array_equal(p[0][512:700], p[2][512:700])  # 1 against 7
    assert not np.array_equal(p[3], p[0][:300])
    assert len({w.tokens.output_token[i] for i in range(4)}) == 4  # outputs differ


@settings(max_examples=30, deadline=None)
@given(st.lists(st.lists(st.integers(0, 5), min_size=1, max_size=4), min_size=2, max_size=5),
       st.sampled_from([16, 32, 48, 512]))
def test_shared_leading_ids_give_equal_kv_blocks_at_any_block_size(ids, block_size):
    lengths = np.array([len(i) * MOONCAKE_BLOCK_TOKENS for i in ids])
    tokens = mooncake_tokens(lengths, np.array(sum(ids, []), dtype=np.uint64),
                             np.array([len(i) for i in ids]))
    for a in range(len(ids)):
        for b in range(len(ids)):
            common = next((k for k, (x, y) in enumerate(zip(ids[a], ids[b])) if x != y),
                          min(len(ids[a]), len(ids[b])))
            shared = common * MOONCAKE_BLOCK_TOKENS // block_size * block_size
            pa, pb = tokens.prompt(a), tokens.prompt(b)
            assert np.array_equal(pa[:shared], pb[:shared])
            if common < min(len(ids[a]), len(ids[b])):  # the first differing block differs
                start = common * MOONCAKE_BLOCK_TOKENS
                assert not np.array_equal(pa[start:start + block_size],
                                          pb[start:start + block_size])


def test_token_ids_inline(tmp_path):
    path = write(tmp_path, [{"arrival_s": 0.0, "prompt_token_ids": [5, 6, 7], "output_tokens": 2,
                             "max_tokens": 8},
                            {"arrival_s": 1.5, "prompt_token_ids": [5, 6], "output_tokens": 3,
                             "max_tokens": 3}])
    w = read_trace(path, rate_scale=2.0)
    assert w.arrival_s.tolist() == [0.0, 0.75]
    assert w.max_tokens.tolist() == [8, 3]
    assert w.tokens.prompt(0).tolist() == [5, 6, 7] and w.tokens.prompt(1).tolist() == [5, 6]
    first = w.subset(np.array([False, True]))
    assert first.tokens.prompt(0).tolist() == [5, 6] and first.num_requests == 1


def test_the_bundled_mooncake_trace_loads_by_name():
    w = read_trace("mooncake-synthetic", num_requests=50)
    assert w.num_requests == 50 and w.tokens.flat.size == w.prompt_tokens.sum()


@pytest.mark.parametrize(("rows", "message"), [
    ([mooncake(0, 1100, [0, 1])],
     "line 1: hash_ids has 2 ids, but input_length 1100 is 3 blocks of 512 tokens"),
    ([mooncake(5, 10, [0]), mooncake(3, 10, [1])],
     "line 2: timestamp 3 is before the line above's (5): requests must be in order"),
    ([{**mooncake(0, 10, [0]), "session": 3}],
     "line 1: unknown field 'session' (fields: timestamp, input_length, output_length, "
     "hash_ids)"),
    ([mooncake(0, 10, [0]), {"timestamp": 1, "input_length": 10, "hash_ids": [0]}],
     "line 2: no field 'output_length'"),
    ([mooncake(0, 10, [0]), "{not json"], "line 2: not JSON"),
    ([mooncake(0, 10, [0]), "[1, 2]"], "line 2: not a JSON object"),
    ([mooncake(0, 0, [])], "line 1: input_length is 0, not an integer from 1 to"),
    ([mooncake(0, 10, [-1])], "line 1: hash_ids is [-1], not a list of integers"),
    ([mooncake(float("nan"), 10, [0])], "line 1: timestamp is nan, not a finite number"),
    ([{"arrival_s": 0, "prompt_token_ids": [1], "output_tokens": 4, "max_tokens": 2}],
     "line 1: max_tokens 2 is below output_tokens 4"),
    ([{"arrival_s": 0, "prompt_token_ids": [1.5], "output_tokens": 4}],
     "line 1: prompt_token_ids is [1.5], not a list of 1 to"),
    ([{"prompt": "hi"}], "line 1: fields prompt are neither Mooncake's"),
])
def test_bad_lines_are_one_error_naming_the_line(tmp_path, rows, message):
    path = write(tmp_path, rows)
    with pytest.raises(WorkloadError) as info:
        read_trace(path)
    text = str(info.value)
    assert text.startswith(f"{path}: ") and message in text and "\n" not in text


def test_empty_trace(tmp_path):
    with pytest.raises(WorkloadError, match="no requests in the trace"):
        read_trace(write(tmp_path, []))

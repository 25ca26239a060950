"""swap_out / swap_in against kvbench.reference, bit for bit (torch.equal).

CPU: every impl (triton under TRITON_INTERPRET=1) over random block tables, block sizes 1/8/16/32
and fp16/bf16/fp32, into poisoned outputs; swap_in must leave every other block untouched.
GPU (`gpu`): the same checks at llama-3-8b geometry, zero-copy and staged (not yet run on a
GPU).
"""

import warnings

import numpy as np
import pytest
import torch

from kvbench.models import DTYPE_BYTES
from kvbench.ops import (
    allocate_kv_cache,
    copy_impls,
    packed_shape,
    prepare_block_ids,
    swap_in,
    swap_out,
)
from kvbench.ops.dtypes import TORCH_DTYPES
from kvbench.ops.kv_copy import COPY_IMPLS, UnalignedCopyWarning, auto_impl
from kvbench.ops.launch import check_grid
from kvbench.reference import swap_in_ref, swap_out_ref

DTYPES = (torch.float16, torch.bfloat16, torch.float32)
BLOCK_SIZES = (1, 8, 16, 32)
TABLES = ("one", "all", "random")
NUM_LAYERS, NUM_BLOCKS, NUM_KV_HEADS, HEAD_DIM = 2, 12, 2, 16


def block_table(kind: str, num_blocks: int, seed: int) -> list[int]:
    generator = torch.Generator().manual_seed(seed)
    order = torch.randperm(num_blocks, generator=generator).tolist()
    count = {"one": 1, "all": num_blocks}.get(kind) or 2 + seed % (num_blocks - 3)
    return order[:count]


def poisoned(shape, dtype) -> torch.Tensor:
    """NaN everywhere: any element a copy fails to write breaks torch.equal."""
    return torch.full(shape, float("nan"), dtype=dtype)


def random_packed(cache: torch.Tensor, num_selected: int, seed: int) -> torch.Tensor:
    generator = torch.Generator(device=cache.device).manual_seed(seed)
    return torch.randn(packed_shape(cache, num_selected), generator=generator,
                       device=cache.device).to(cache.dtype)


def impl_param(name: str):
    """An impl as a test parameter, skipped with its own reason where it cannot run here."""
    reason = COPY_IMPLS[name].unavailable(torch.device("cpu"))
    return pytest.param(name, marks=pytest.mark.skipif(reason is not None, reason=str(reason)))


IMPLS = [impl_param(name) for name in COPY_IMPLS] + ["auto"]


@pytest.mark.parametrize("table", TABLES)
@pytest.mark.parametrize("block_size", BLOCK_SIZES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("impl", IMPLS)
def test_swap_out_matches_reference(impl, dtype, block_size, table):
    seed = BLOCK_SIZES.index(block_size) * 10 + TABLES.index(table)
    cache = allocate_kv_cache(NUM_LAYERS, NUM_BLOCKS, block_size, NUM_KV_HEADS, HEAD_DIM, dtype,
                              seed=seed)
    before = cache.clone()
    ids = block_table(table, NUM_BLOCKS, seed)
    dst = poisoned(packed_shape(cache, len(ids)), dtype)
    assert swap_out(cache, ids, dst, impl=impl) is dst
    assert torch.equal(dst, swap_out_ref(cache, ids))
    assert torch.equal(cache, before)


@pytest.mark.parametrize("table", TABLES)
@pytest.mark.parametrize("block_size", BLOCK_SIZES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("impl", IMPLS)
def test_swap_in_touches_only_its_blocks(impl, dtype, block_size, table):
    seed = 100 + BLOCK_SIZES.index(block_size) * 10 + TABLES.index(table)
    cache = allocate_kv_cache(NUM_LAYERS, NUM_BLOCKS, block_size, NUM_KV_HEADS, HEAD_DIM, dtype,
                              seed=seed)
    ids = block_table(table, NUM_BLOCKS, seed)
    src = random_packed(cache, len(ids), seed)
    expected = swap_in_ref(src, cache, ids)  # every other block keeps its old bits
    src_before = src.clone()
    assert swap_in(src, cache, ids, impl=impl) is None
    assert torch.equal(cache, expected)
    assert torch.equal(src, src_before)


@pytest.mark.interpreter
@pytest.mark.parametrize("num_programs, vector_width, head_dim",
                         [(1, None, 16), (3, 1, 16), (5, 2, 24), (None, 16, 24), (2, 4, 40)])
def test_triton_options_and_partial_tiles(num_programs, vector_width, head_dim):
    """Grid sizes and tile widths that leave partial tiles (block of 8·3·24 = 576 elements)."""
    cache = allocate_kv_cache(3, 9, 8, 3, head_dim, torch.float16, seed=7)
    ids = [8, 0, 4, 5]
    options = dict(impl="triton", num_programs=num_programs, vector_width=vector_width)
    dst = swap_out(cache, ids, poisoned(packed_shape(cache, len(ids)), cache.dtype), **options)
    assert torch.equal(dst, swap_out_ref(cache, ids))
    src = random_packed(cache, len(ids), 8)
    expected = swap_in_ref(src, cache, ids)
    swap_in(src, cache, ids, **options)
    assert torch.equal(cache, expected)


@pytest.mark.parametrize("impl", IMPLS)
def test_round_trip_moves_blocks(impl):
    """Swap three blocks out and back in at other ids, as a preempted request resumes."""
    cache = allocate_kv_cache(2, 10, 4, 2, 32, torch.bfloat16, seed=3)
    out_ids, in_ids = [2, 9, 4], [0, 7, 3]
    expected = swap_in_ref(swap_out_ref(cache, out_ids), cache, in_ids)
    swap_in(swap_out(cache, out_ids, impl=impl), cache, in_ids, impl=impl)
    assert torch.equal(cache, expected)


@pytest.mark.parametrize("ids", [torch.tensor([3, 1], dtype=torch.int32), np.array([3, 1]),
                                 range(3, 0, -2), (3, 1)])
def test_block_id_containers(ids):
    cache = allocate_kv_cache(2, 5, 2, 1, 16, torch.float32)
    assert torch.equal(swap_out(cache, ids, impl="torch"), swap_out_ref(cache, [3, 1]))


@pytest.mark.parametrize("impl", IMPLS)
def test_empty_block_table_is_a_no_op(impl):
    cache = allocate_kv_cache(2, 4, 2, 1, 16, torch.float16)
    before = cache.clone()
    assert swap_out(cache, [], impl=impl).shape == packed_shape(cache, 0)
    swap_in(torch.empty(packed_shape(cache, 0), dtype=cache.dtype), cache, [], impl=impl)
    assert torch.equal(cache, before)


def test_default_dst_is_a_cpu_tensor():
    cache = allocate_kv_cache(2, 4, 2, 1, 16, torch.float16)
    dst = swap_out(cache, [1])
    assert dst.device.type == "cpu" and dst.dtype == cache.dtype and dst.is_contiguous()


def test_allocate_kv_cache_is_seeded_random():
    cache = allocate_kv_cache(2, 3, 4, 2, 8, "bf16", seed=5)
    assert cache.shape == (2, 2, 3, 4, 2, 8) and cache.dtype == torch.bfloat16
    assert torch.equal(cache, allocate_kv_cache(2, 3, 4, 2, 8, torch.bfloat16, seed=5))
    assert cache.count_nonzero() > 0.99 * cache.numel()
    with pytest.raises(ValueError, match="num_blocks must be a positive integer"):
        allocate_kv_cache(2, 0, 4, 2, 8)


def test_copy_impls_lists_triton_only_where_it_runs(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    assert "triton" not in copy_impls("cpu") and {"torch", "per_block"} <= set(copy_impls("cpu"))
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert set(copy_impls("cpu")) <= set(COPY_IMPLS) and "torch" in copy_impls("cpu")


def test_auto_is_a_rule_not_a_measurement():
    """auto names its impl from the device alone: for CUDA it answers on this GPU-less machine,
    so it cannot be timing anything."""
    pytest.importorskip("triton")
    assert auto_impl("cpu") == "torch"
    assert auto_impl("cuda") == "triton"


def test_options_reach_only_the_impl_that_takes_them():
    cache = allocate_kv_cache(2, 4, 2, 1, 16, torch.float16)
    assert torch.equal(swap_out(cache, [1], impl="torch", zero_copy=None),  # None: not given
                       swap_out_ref(cache, [1]))
    with pytest.raises(ValueError, match="only apply to impl='triton', not 'torch' "
                                         r"\(what impl='auto' runs on cpu\)"):
        swap_out(cache, [1], impl="auto", num_programs=4)
    with pytest.raises(ValueError, match="takes no option tile"):
        swap_out(cache, [1], impl="torch", tile=4)


@pytest.mark.parametrize("impl", IMPLS)
def test_prepared_block_ids_match_a_list(impl):
    cache = allocate_kv_cache(2, 9, 4, 2, 16, torch.bfloat16, seed=4)
    ids = prepare_block_ids(cache, [7, 0, 3])
    assert ids.host.tolist() == [7, 0, 3] and ids.device_int32.dtype == torch.int32
    assert torch.equal(swap_out(cache, ids, impl=impl), swap_out_ref(cache, [7, 0, 3]))
    src = random_packed(cache, 3, 5)
    expected = swap_in_ref(src, cache, [7, 0, 3])
    swap_in(src, cache, ids, impl=impl)
    assert torch.equal(cache, expected)


def test_prepared_block_ids_belong_to_their_cache():
    ids = prepare_block_ids(allocate_kv_cache(2, 9, 4, 2, 16), [1, 2])
    with pytest.raises(ValueError, match="prepared for a cache of 9 blocks"):
        swap_out(allocate_kv_cache(2, 5, 4, 2, 16), ids)


@pytest.mark.interpreter
def test_unaligned_tensors_are_reported():
    """A packed tensor one element past a 16-byte boundary, then blocks of 8 bytes: the
    compiled copy could not use 16-byte accesses, and the wrapper says so (and still copies)."""
    cache = allocate_kv_cache(2, 6, 4, 2, 16, torch.float16, seed=2)
    ids = [4, 1]
    backing = torch.empty(torch.Size(packed_shape(cache, 2)).numel() + 1, dtype=cache.dtype)
    dst = backing[1:].view(packed_shape(cache, 2))
    with pytest.warns(UnalignedCopyWarning, match="destination starts 2 bytes past"):
        swap_out(cache, ids, dst, impl="triton")
    assert torch.equal(dst, swap_out_ref(cache, ids))
    with warnings.catch_warnings():
        warnings.simplefilter("error", UnalignedCopyWarning)
        swap_out(cache, ids, impl="triton")  # aligned: silent
    narrow = allocate_kv_cache(2, 6, 1, 1, 4, torch.float16)
    with pytest.warns(UnalignedCopyWarning, match="is 8 bytes, not a multiple of 16"):
        swap_out(narrow, ids, impl="triton")


def test_grid_limits():
    check_grid("op", (2**31 - 1, 65535, 65535))
    with pytest.raises(ValueError, match="grid axis 1 has 65536 programs"):
        check_grid("op", (1, 65536))


def test_one_dtype_table():
    assert TORCH_DTYPES.keys() == DTYPE_BYTES.keys()
    assert all(TORCH_DTYPES[name].itemsize == size for name, size in DTYPE_BYTES.items())


def test_triton_on_cpu_without_interpreter_says_so(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    cache = allocate_kv_cache(2, 4, 2, 1, 16, torch.float16)
    with pytest.raises(ValueError, match="TRITON_INTERPRET=1"):
        swap_out(cache, [1], impl="triton")


CACHE = allocate_kv_cache(2, 6, 4, 2, 16, torch.float16)
PACKED2 = torch.zeros(packed_shape(CACHE, 2), dtype=torch.float16)
BAD_CALLS = [
    (lambda: swap_out(CACHE[0], [1]), ValueError, "must have shape"),
    (lambda: swap_out(CACHE.reshape(2, 3, 4, 4, 2, 16), [1]), ValueError, "must have shape"),
    (lambda: swap_out(CACHE.transpose(3, 4), [1]), ValueError, "contiguous"),
    (lambda: swap_out(CACHE.numpy(), [1]), TypeError, "torch.Tensor"),
    (lambda: swap_out(CACHE, [1, 6]), ValueError, "block id 6 is out of range"),
    (lambda: swap_out(CACHE, [-1]), ValueError, "block id -1 is out of range"),
    (lambda: swap_out(CACHE, [2, 5, 2]), ValueError, "block id 2 appears more than once"),
    (lambda: swap_out(CACHE, [1.0, 2.0]), TypeError, "integers"),
    (lambda: swap_out(CACHE, [[1, 2]]), ValueError, "1-D"),
    (lambda: swap_out(CACHE, 3), TypeError, "sequence of ints"),
    (lambda: swap_out(CACHE, [1], PACKED2), ValueError, "dst must have shape"),
    (lambda: swap_out(CACHE, [1, 2], PACKED2.float()), TypeError, "dtype"),
    (lambda: swap_out(CACHE, [1, 2], PACKED2.transpose(4, 5).contiguous().transpose(4, 5)),
     ValueError, "contiguous"),
    (lambda: swap_out(CACHE, [1], impl="cuda"), ValueError, "unknown impl"),
    (lambda: swap_out(CACHE, [1], impl="torch", num_programs=4), ValueError, "only apply"),
    (lambda: swap_out(CACHE, [1], impl="triton", vector_width=3), ValueError, "power of two"),
    (lambda: swap_out(CACHE, [1], impl="triton", num_programs=0), ValueError, "positive"),
    (lambda: swap_in(PACKED2, CACHE, [1]), ValueError, "src must have shape"),
    (lambda: swap_in(PACKED2.bfloat16(), CACHE, [1, 2]), TypeError, "dtype"),
    (lambda: swap_in(PACKED2, CACHE, [1, 1]), ValueError, "more than once"),
]


@pytest.mark.parametrize("call, error, message", BAD_CALLS)
def test_bad_input_raises_a_clear_error(call, error, message):
    before = CACHE.clone()
    with pytest.raises(error, match=message):
        call()
    assert torch.equal(CACHE, before)


@pytest.mark.gpu
@pytest.mark.parametrize("impl, zero_copy", [("triton", True), ("triton", False),
                                             ("torch", None), ("per_block", None),
                                             ("batched_dma", None), ("auto", None)])
@pytest.mark.parametrize("dtype, block_size", [(torch.bfloat16, 16), (torch.float16, 1),
                                               (torch.float32, 32)])
def test_gpu_swap_round_trip(impl, zero_copy, dtype, block_size):
    """llama-3-8b geometry (32 layers, 8 KV heads, head_dim 128): 256 random blocks of 1024."""
    if impl != "auto" and COPY_IMPLS[impl].unavailable(torch.device("cuda")):
        pytest.skip(COPY_IMPLS[impl].unavailable(torch.device("cuda")))
    cache = allocate_kv_cache(32, 1024, block_size, 8, 128, dtype, device="cuda", seed=11)
    ids = torch.randperm(1024, generator=torch.Generator().manual_seed(11))[:256].tolist()
    options = {"zero_copy": zero_copy} if zero_copy is not None else {}
    dst = torch.full(packed_shape(cache, len(ids)), float("nan"), dtype=dtype, pin_memory=True)
    swap_out(cache, ids, dst, impl=impl, **options)
    torch.cuda.synchronize()
    assert torch.equal(dst, swap_out_ref(cache, ids).cpu())
    src = random_packed(cache, len(ids), 12).cpu().pin_memory()
    expected = swap_in_ref(src, cache, ids)
    swap_in(src, cache, ids, impl=impl, **options)
    torch.cuda.synchronize()
    assert torch.equal(cache, expected)


@pytest.mark.gpu
def test_gpu_default_dst_is_pinned_and_pageable_falls_back():
    cache = allocate_kv_cache(4, 64, 16, 8, 128, torch.bfloat16, device="cuda")
    ids = [5, 63, 0]
    dst = swap_out(cache, ids, impl="triton")
    torch.cuda.synchronize()
    assert dst.is_pinned() and torch.equal(dst, swap_out_ref(cache, ids).cpu())
    pageable = poisoned(packed_shape(cache, len(ids)), cache.dtype)  # staged path
    swap_out(cache, ids, pageable, impl="triton")
    torch.cuda.synchronize()
    assert torch.equal(pageable, swap_out_ref(cache, ids).cpu())
    with pytest.raises(ValueError, match="pinned"):
        swap_out(cache, ids, pageable, impl="triton", zero_copy=True)


def test_batched_dma_is_skipped_off_cuda_with_its_reason():
    assert "batched_dma" not in copy_impls("cpu")
    cache = allocate_kv_cache(2, 4, 2, 1, 16, torch.float16)
    with pytest.raises(ValueError, match="batched_dma.*needs a CUDA device"):
        swap_out(cache, [1], impl="batched_dma")


@pytest.mark.parametrize("scatter", [False, True])
def test_batched_dma_addresses_are_the_blocks(scatter):
    """The address lists the batched DMA hands the driver, checked against the addresses of
    the tensors' own block views (on CPU tensors: the arithmetic is the same)."""
    from kvbench.ops.cuda_dma import block_addresses

    cache = allocate_kv_cache(3, 7, 4, 2, 16, torch.bfloat16)
    ids = torch.tensor([5, 0, 3])
    packed = torch.empty(packed_shape(cache, 3), dtype=cache.dtype)
    dsts, srcs, nbytes = block_addresses(cache, packed, ids, scatter)
    cache_at = [cache[layer, kv, b].data_ptr() for layer in range(3) for kv in range(2)
                for b in ids.tolist()]
    packed_at = [packed[layer, kv, i].data_ptr() for layer in range(3) for kv in range(2)
                 for i in range(3)]
    assert nbytes == 4 * 2 * 16 * 2
    assert (dsts.tolist(), srcs.tolist()) == ((cache_at, packed_at) if scatter
                                              else (packed_at, cache_at))

"""Paged KV-cache block copies: gather a request's blocks out of the cache, scatter them back.

The cache is one contiguous tensor [L, 2, num_blocks, block_size, Hkv, d]. Flattened, it is
L·2·num_blocks rows of BLOCK_NUMEL = block_size·Hkv·d contiguous elements: cache row
(lk, b), with lk = 2·layer + (0 for K, 1 for V), starts at element (lk·num_blocks + b)·BLOCK_NUMEL.
A request's n blocks packed in order are L·2·n rows: packed row (lk, i) starts at
(lk·n + i)·BLOCK_NUMEL.

    gather  (swap-out):  packed[lk, i] = cache[lk, block_ids[i]]
    scatter (swap-in):   cache[lk, block_ids[i]] = packed[lk, i]

One launch moves all L·2·n rows. Each row is cut into tiles of TILE elements; a persistent grid
of P programs walks the tiles with stride P (the "SM budget" is P). The wrapper passes both
tensors viewed as same-width integers, so a copy is bit-exact for any dtype.

Tested in Triton's interpreter only: the compiled kernel has not yet been run on a GPU. The
compile gate (`kvbench.compile_gate`) compiles it for sm_80 and sm_90 at calibration's shapes
and buffers and checks that both sides move 16 bytes per access.
"""

import triton
import triton.language as tl


@triton.jit
def copy_blocks_kernel(
    src_ptr, dst_ptr,  # packed and cache (scatter) or cache and packed (gather)
    block_ids_ptr,  # int32 [num_selected]: cache block of each packed block
    num_selected, num_cache_blocks, num_tiles,
    BLOCK_NUMEL: tl.constexpr,  # elements of one block of one layer's K or V
    TILE: tl.constexpr,  # elements one program moves per step (power of two)
    SCATTER: tl.constexpr,  # False: cache -> packed (swap-out); True: packed -> cache (swap-in)
):
    TILES_PER_ROW: tl.constexpr = (BLOCK_NUMEL + TILE - 1) // TILE
    offs = tl.arange(0, TILE)
    for tile in range(tl.program_id(0), num_tiles, tl.num_programs(0)):
        row = tile // TILES_PER_ROW
        lk = row // num_selected
        block = tl.load(block_ids_ptr + row % num_selected).to(tl.int64)
        # int64 row starts: a whole cache easily holds more than 2**31 elements
        packed_start = tl.cast(row, tl.int64) * BLOCK_NUMEL
        cache_start = (tl.cast(lk, tl.int64) * num_cache_blocks + block) * BLOCK_NUMEL
        if SCATTER:
            src_start = packed_start
            dst_start = cache_start
        else:
            src_start = cache_start
            dst_start = packed_start
        cols = (tile % TILES_PER_ROW) * TILE + offs
        if BLOCK_NUMEL % TILE == 0:
            tl.store(dst_ptr + dst_start + cols, tl.load(src_ptr + src_start + cols))
        else:  # last tile of a row is partial
            mask = cols < BLOCK_NUMEL
            tl.store(dst_ptr + dst_start + cols, tl.load(src_ptr + src_start + cols, mask=mask),
                     mask=mask)

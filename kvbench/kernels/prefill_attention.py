"""Causal prefill attention forward: FlashAttention-2 (Dao, 2023, arXiv:2307.08691), following
the structure of Triton's tutorial 06-fused-attention, over packed variable-length sequences.

Per sequence s (tokens cu_seqlens[s] .. cu_seqlens[s+1]), query head h and its KV head
h // GROUP_SIZE (grouped-query attention):

    S = Q Kᵀ · sm_scale,   S[i, j] = -inf where j > i (causal) or j ≥ seqlen,
    O = softmax(S) V.

One program owns BLOCK_M query rows of one head of one sequence; Q stays on chip while K and V
stream through in tiles of BLOCK_N rows. Online softmax keeps a running row max m and sum l:

    m' = max(m, rowmax(S_j)),   P_j = exp(S_j - m'),   α = exp(m - m'),
    l' = α·l + rowsum(P_j),     acc' = α·acc + P_j V_j,        O = acc / l  at the end.

Exponentials are base 2 with log2(e) folded into the scale. Key tiles wholly below the causal
diagonal (or wholly inside the sequence when not causal) need no mask; the loop is split in
two so only the few diagonal / tail tiles pay for masking.

Programs: axis 0 walks (query tile, sequence) pairs, heaviest query tiles first; axis 1 is
the query head. Tile sizes, warps and stages are the launch's choice (`kvbench.ops`).

Tested in Triton's interpreter only: the compiled kernel has not yet been run on a GPU. The
compile gate (`kvbench.compile_gate`) compiles the configs the wrapper launches for sm_80 and
sm_90 and checks registers, spills, shared memory and (sm_90, 16-bit) wgmma.
"""

import triton
import triton.language as tl


@triton.jit
def _attend_tiles(acc, l_i, m_i, q, k_ptrs, v_ptrs, stride_kn, stride_vn, offs_m, offs_n,
                  start, stop, seqlen, qk_scale,
                  MASKED: tl.constexpr, CAUSAL: tl.constexpr, BLOCK_N: tl.constexpr,
                  DOT_FP32: tl.constexpr, DOT_PRECISION: tl.constexpr):
    for start_n in range(start, stop, BLOCK_N):
        start_n = tl.multiple_of(start_n, BLOCK_N)
        cols = start_n + offs_n
        if MASKED:
            k = tl.load(k_ptrs + start_n * stride_kn, mask=cols[None, :] < seqlen, other=0.0)
        else:
            k = tl.load(k_ptrs + start_n * stride_kn)
        if DOT_FP32:
            k = k.to(tl.float32)
        qk = tl.dot(q, k, input_precision=DOT_PRECISION) * qk_scale
        if MASKED:
            keep = cols[None, :] < seqlen
            if CAUSAL:
                keep = keep & (offs_m[:, None] >= cols[None, :])
            # every row meets a kept key in its first tile, so m_i is finite and no -inf - -inf
            qk = tl.where(keep, qk, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(qk, 1))
        p = tl.math.exp2(qk - m_new[:, None])
        alpha = tl.math.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        if MASKED:
            v = tl.load(v_ptrs + start_n * stride_vn, mask=cols[:, None] < seqlen, other=0.0)
        else:
            v = tl.load(v_ptrs + start_n * stride_vn)
        p = p.to(v.dtype)  # P V runs on tensor cores in the input dtype, as in FlashAttention
        if DOT_FP32:
            p = p.to(tl.float32)
            v = v.to(tl.float32)
        acc = tl.dot(p, v, acc * alpha[:, None], input_precision=DOT_PRECISION)
        m_i = m_new
    return acc, l_i, m_i


@triton.jit
def prefill_attention_kernel(
    q_ptr, k_ptr, v_ptr, out_ptr,  # q, out [n, Hq, d]; k, v [n, Hkv, d]; unit stride over d
    cu_seqlens_ptr,  # int32 [num_seqs + 1]: sequence s is tokens cu[s] .. cu[s+1]
    sm_scale,
    stride_qn, stride_qh, stride_kn, stride_kh, stride_vn, stride_vh, stride_on, stride_oh,
    GROUP_SIZE,  # query heads per KV head
    num_seqs,
    HEAD_DIM: tl.constexpr, CAUSAL: tl.constexpr,
    DOT_FP32: tl.constexpr,  # upcast dot operands (the interpreter cannot multiply bfloat16)
    DOT_PRECISION: tl.constexpr,  # "ieee" for float32 inputs: exact products, no TF32
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    tl.static_assert(BLOCK_M % BLOCK_N == 0)  # causal: the diagonal starts on a tile edge
    # Heaviest query tiles first: causal work grows with start_m, and the GPU dispatches
    # programs in order of program_id(0), so launching the long rows last leaves a long tail
    # of a few busy SMs (FlashAttention-3 schedules longest-first for the same reason).
    # Sequences share axis 0 with the tiles: axes 1 and 2 stop at 65535 programs.
    pid = tl.program_id(0)
    start_m = tl.num_programs(0) // num_seqs - 1 - pid // num_seqs
    seq = pid % num_seqs
    head = tl.program_id(1)
    seq_start = tl.load(cu_seqlens_ptr + seq)
    seqlen = tl.load(cu_seqlens_ptr + seq + 1) - seq_start
    if start_m * BLOCK_M >= seqlen:  # grid covers the longest sequence; this one is shorter
        return
    kv_head = head // GROUP_SIZE
    first = seq_start.to(tl.int64)
    offs_m = start_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    q_ptrs = (q_ptr + first * stride_qn + head * stride_qh
              + offs_m[:, None] * stride_qn + offs_d[None, :])
    # K is read transposed, [HEAD_DIM, BLOCK_N], so that S = Q K is a plain dot
    k_ptrs = (k_ptr + first * stride_kn + kv_head * stride_kh
              + offs_n[None, :] * stride_kn + offs_d[:, None])
    v_ptrs = (v_ptr + first * stride_vn + kv_head * stride_vh
              + offs_n[:, None] * stride_vn + offs_d[None, :])
    row_ok = offs_m[:, None] < seqlen
    q = tl.load(q_ptrs, mask=row_ok, other=0.0)  # stays on chip for the whole key loop
    if DOT_FP32:
        q = q.to(tl.float32)
    qk_scale = sm_scale * 1.4426950408889634  # log2(e): exp(x) = exp2(x·log2 e)
    m_i = tl.zeros([BLOCK_M], dtype=tl.float32) - float("inf")
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    if CAUSAL:  # keys before this tile's first row: no mask; the diagonal tiles: masked
        unmasked_stop = start_m * BLOCK_M
        stop = tl.minimum((start_m + 1) * BLOCK_M, seqlen)
    else:  # whole key tiles: no mask; the partial last tile: masked
        unmasked_stop = (seqlen // BLOCK_N) * BLOCK_N
        stop = seqlen
    acc, l_i, m_i = _attend_tiles(acc, l_i, m_i, q, k_ptrs, v_ptrs, stride_kn, stride_vn,
                                  offs_m, offs_n, 0, unmasked_stop, seqlen, qk_scale,
                                  False, CAUSAL, BLOCK_N, DOT_FP32, DOT_PRECISION)
    acc, l_i, m_i = _attend_tiles(acc, l_i, m_i, q, k_ptrs, v_ptrs, stride_kn, stride_vn,
                                  offs_m, offs_n, unmasked_stop, stop, seqlen, qk_scale,
                                  True, CAUSAL, BLOCK_N, DOT_FP32, DOT_PRECISION)
    out = acc / l_i[:, None]
    o_ptrs = (out_ptr + first * stride_on + head * stride_oh
              + offs_m[:, None] * stride_on + offs_d[None, :])
    tl.store(o_ptrs, out.to(out_ptr.dtype.element_ty), mask=row_ok)

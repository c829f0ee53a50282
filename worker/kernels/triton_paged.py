"""Triton kernels over the paged KV cache: store a step's K/V, and attend every query of the step.

One attention launch serves a whole step: each program takes one sequence's tile of queries for one
KV head, with the query heads that share that KV head stacked as rows of the tile (so a decode's
handful of heads still fills a matrix product), and walks the sequence's keys block table entry by
block table entry, reading the cache in place (online softmax, as FlashAttention does). Decodes and
prefill chunks differ only in their number of queries; queries see the keys at or before their own
position, inside the layer's sliding window.

On a machine without CUDA the same kernels run in Triton's interpreter (TRITON_INTERPRET=1 before
triton is imported), which is how the CPU tests check them; the interpreter cannot multiply
bfloat16 tiles, so those tests use float32 and float16.
"""

import triton
import triton.language as tl


@triton.jit
def store_kv(
    k_ptr,
    v_ptr,
    key_cache_ptr,
    value_cache_ptr,
    slot_ptr,
    k_stride,
    v_stride,
    cache_stride,
    WIDTH: tl.constexpr,
    WIDTH_PAD: tl.constexpr,
):
    """One program per new token: its K and V rows into its cache slot; slot -1 is a padding row."""
    token = tl.program_id(0).to(tl.int64)
    slot = tl.load(slot_ptr + token)
    if slot >= 0:
        columns = tl.arange(0, WIDTH_PAD)
        inside = columns < WIDTH
        key = tl.load(k_ptr + token * k_stride + columns, mask=inside)
        value = tl.load(v_ptr + token * v_stride + columns, mask=inside)
        tl.store(key_cache_ptr + slot * cache_stride + columns, key, mask=inside)
        tl.store(value_cache_ptr + slot * cache_stride + columns, value, mask=inside)


@triton.jit
def paged_attention(  # one program: a tile of one sequence's queries, one KV head
    q_ptr,
    out_ptr,
    key_cache_ptr,
    value_cache_ptr,
    block_tables_ptr,
    query_start_ptr,
    seq_lens_ptr,
    q_token_stride,
    q_head_stride,
    out_token_stride,
    out_head_stride,
    cache_stride,
    table_stride,
    scale,
    softcap,
    window,
    GROUP: tl.constexpr,  # query heads per KV head
    HEAD_DIM: tl.constexpr,
    HEAD_PAD: tl.constexpr,  # HEAD_DIM up to a power of two, at least 16
    BLOCK_SIZE: tl.constexpr,  # tokens per cache block
    BLOCK_M: tl.constexpr,  # rows of a tile: BLOCK_Q queries x GROUP heads, padded
    BLOCK_Q: tl.constexpr,
    BLOCK_N: tl.constexpr,  # keys per inner step
    HAS_SOFTCAP: tl.constexpr,
    HAS_WINDOW: tl.constexpr,
    PRECISION: tl.constexpr,  # "ieee" for float32 products in float32 (not TF32), else "tf32"
):
    seq = tl.program_id(0)
    q_tile = tl.program_id(1)
    kv_head = tl.program_id(2)
    q_start = tl.load(query_start_ptr + seq)
    q_len = tl.load(query_start_ptr + seq + 1) - q_start
    if q_tile * BLOCK_Q < q_len:
        seq_len = tl.load(seq_lens_ptr + seq)
        first_pos = seq_len - q_len  # position of the sequence's first query this step
        rows = tl.arange(0, BLOCK_M)
        q_index = q_tile * BLOCK_Q + rows // GROUP
        q_row = (q_start + q_index).to(tl.int64)  # row offsets in 64 bits: steps of any size
        head = kv_head * GROUP + rows % GROUP
        row_valid = (rows < BLOCK_Q * GROUP) & (q_index < q_len)
        q_pos = first_pos + q_index
        dims = tl.arange(0, HEAD_PAD)
        dim_valid = dims < HEAD_DIM
        q = tl.load(
            q_ptr
            + (q_start + q_index)[:, None] * q_token_stride
            + head[:, None] * q_head_stride
            + dims[None, :],
            mask=row_valid[:, None] & dim_valid[None, :],
            other=0.0,
        )
        m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_M], tl.float32)
        acc = tl.zeros([BLOCK_M, HEAD_PAD], tl.float32)
        tile_first = first_pos + q_tile * BLOCK_Q
        hi = tl.minimum(tile_first + BLOCK_Q, seq_len)  # past the tile's last query's keys
        lo_visible = 0
        if HAS_WINDOW:
            lo_visible = tl.maximum(tile_first - window + 1, 0)  # blocks before it may be released
        lo = (lo_visible // BLOCK_N) * BLOCK_N
        for start in range(lo, hi, BLOCK_N):
            key_pos = start + tl.arange(0, BLOCK_N)
            readable = (key_pos >= lo_visible) & (key_pos < hi)
            block = tl.load(
                block_tables_ptr + seq * table_stride + key_pos // BLOCK_SIZE, mask=readable, other=0
            )
            slot = block.to(tl.int64) * BLOCK_SIZE + key_pos % BLOCK_SIZE
            offset = kv_head * HEAD_DIM
            k = tl.load(
                key_cache_ptr + slot[None, :] * cache_stride + offset + dims[:, None],
                mask=readable[None, :] & dim_valid[:, None],
                other=0.0,
            )  # [HEAD_PAD, BLOCK_N]
            scores = tl.dot(q, k, input_precision=PRECISION) * scale
            if HAS_SOFTCAP:
                scores = softcap * (2.0 * tl.sigmoid(2.0 * scores / softcap) - 1.0)  # softcap * tanh
            visible = readable[None, :] & row_valid[:, None] & (key_pos[None, :] <= q_pos[:, None])
            if HAS_WINDOW:
                visible = visible & (key_pos[None, :] > q_pos[:, None] - window)
            scores = tl.where(visible, scores, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(scores, 1))
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # rows that see nothing yet
            p = tl.exp(scores - m_safe[:, None])
            alpha = tl.exp(m_i - m_safe)
            l_i = l_i * alpha + tl.sum(p, 1)
            v = tl.load(
                value_cache_ptr + slot[:, None] * cache_stride + offset + dims[None, :],
                mask=readable[:, None] & dim_valid[None, :],
                other=0.0,
            )  # [BLOCK_N, HEAD_PAD]
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
            m_i = m_new
        out = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]
        tl.store(
            out_ptr + q_row[:, None] * out_token_stride + head[:, None] * out_head_stride + dims[None, :],
            out.to(out_ptr.dtype.element_ty),
            mask=row_valid[:, None] & dim_valid[None, :],
        )

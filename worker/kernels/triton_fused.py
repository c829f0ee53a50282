"""Triton kernels fusing a decoder layer's small elementwise chains, for 16-bit steps on CUDA.

At decode batch sizes a layer's matrix products are a few microseconds each, and so is every
elementwise launch: RMSNorm as torch ops is seven kernels, RoPE on q and k ten, SiLU-and-multiply
two. Each chain here is one kernel that rounds to the input dtype where transformers does (RoPE
bit for bit with it; the norm's rsqrt and SiLU's sigmoid are the GPU's fast ones, so a value may
now and then differ in its last bit). float32 engines keep the torch ops, which match transformers
bit for bit.
"""

import triton
import triton.language as tl

NORM_LLAMA = 0  # weight * normed.to(dtype)
NORM_WEIGHT_IN_FLOAT32 = 1  # (weight * normed).to(dtype), OLMo 2
NORM_GEMMA = 2  # (normed * (1 + weight)).to(dtype)


@triton.jit
def rms_norm(
    x_ptr,
    residual_ptr,
    weight_ptr,
    out_ptr,
    total_ptr,
    x_stride,
    residual_stride,
    out_stride,
    num_cols,
    eps,
    MODE: tl.constexpr,
    HAS_RESIDUAL: tl.constexpr,  # norm residual + x, and store that sum (rows of out's stride)
    BLOCK: tl.constexpr,
):
    """One program per row."""
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    inside = cols < num_cols
    x = tl.load(x_ptr + row * x_stride + cols, mask=inside, other=0.0)
    if HAS_RESIDUAL:
        residual = tl.load(residual_ptr + row * residual_stride + cols, mask=inside, other=0.0)
        x = (residual.to(tl.float32) + x.to(tl.float32)).to(x.dtype)
        tl.store(total_ptr + row * out_stride + cols, x, mask=inside)
    xf = x.to(tl.float32)
    normed = xf * tl.rsqrt(tl.sum(xf * xf, 0) / num_cols + eps)
    weight = tl.load(weight_ptr + cols, mask=inside, other=0.0).to(tl.float32)
    if MODE == 0:
        y = weight * normed.to(x.dtype).to(tl.float32)
    elif MODE == 1:
        y = weight * normed
    else:
        y = normed * (1.0 + weight)
    tl.store(out_ptr + row * out_stride + cols, y.to(out_ptr.dtype.element_ty), mask=inside)


@triton.jit
def rotary_in_place(
    q_ptr,
    k_ptr,
    cos_ptr,
    sin_ptr,
    q_token_stride,
    q_head_stride,
    k_token_stride,
    k_head_stride,
    table_stride,
    NUM_Q_HEADS: tl.constexpr,
    NUM_K_HEADS: tl.constexpr,
    HEADS_PAD: tl.constexpr,
    HALF: tl.constexpr,  # half the rotated dims; the rest of a head is left as it is
    HALF_PAD: tl.constexpr,
):
    """One program per token: q's and k's heads rotated (GPT-NeoX halves), as transformers does."""
    token = tl.program_id(0).to(tl.int64)
    dims = tl.arange(0, HALF_PAD)
    heads = tl.arange(0, HEADS_PAD)
    dim_ok = dims < HALF
    cos = tl.load(cos_ptr + token * table_stride + dims, mask=dim_ok, other=0.0).to(tl.float32)[None, :]
    sin = tl.load(sin_ptr + token * table_stride + dims, mask=dim_ok, other=0.0).to(tl.float32)[None, :]
    for which in tl.static_range(2):
        if which == 0:
            base = q_ptr + token * q_token_stride
            head_stride = q_head_stride
            num_heads = NUM_Q_HEADS
        else:
            base = k_ptr + token * k_token_stride
            head_stride = k_head_stride
            num_heads = NUM_K_HEADS
        ok = (heads < num_heads)[:, None] & dim_ok[None, :]
        first = base + heads[:, None] * head_stride + dims[None, :]
        x1 = tl.load(first, mask=ok, other=0.0)
        x2 = tl.load(first + HALF, mask=ok, other=0.0)
        f1, f2 = x1.to(tl.float32), x2.to(tl.float32)
        dtype = x1.dtype  # each product rounded, then their sum, as torch computes it in 16 bits
        rotated1 = (f1 * cos).to(dtype).to(tl.float32) - (f2 * sin).to(dtype).to(tl.float32)
        rotated2 = (f2 * cos).to(dtype).to(tl.float32) + (f1 * sin).to(dtype).to(tl.float32)
        tl.store(first, rotated1.to(dtype), mask=ok)
        tl.store(first + HALF, rotated2.to(dtype), mask=ok)


@triton.jit
def silu_and_mul(
    x_ptr,
    out_ptr,
    x_stride,
    out_stride,
    width,
    BLOCK: tl.constexpr,
):
    """out = silu(gate) * up for x = [gate | up], a (row, column block) per program."""
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    inside = cols < width
    gate = tl.load(x_ptr + row * x_stride + cols, mask=inside, other=0.0)
    up = tl.load(x_ptr + row * x_stride + width + cols, mask=inside, other=0.0)
    g = gate.to(tl.float32)
    activated = (g * tl.sigmoid(g)).to(gate.dtype).to(tl.float32)
    tl.store(out_ptr + row * out_stride + cols, (activated * up.to(tl.float32)).to(gate.dtype), mask=inside)

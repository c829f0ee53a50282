"""Each device's fused kernels against the decoder's own torch ops (RMSNorm in each family's
rounding, RoPE over whole and partial heads of strided q/k views, SiLU-and-multiply): Triton's on
CUDA where there is one, else in Triton's interpreter (float32 and float16 there); C's on the CPU
(float32, RoPE bit for bit)."""

import importlib.util

import pytest
import torch

from worker.cpu_fused_ops import CpuFusedOps
from worker.families import FAMILIES
from worker.fused_ops import FusedOps
from worker.model import RMSNorm, Rotation

CUDA = torch.cuda.is_available()
HAS_TRITON = importlib.util.find_spec("triton") is not None
TRITON_DTYPES = [(torch.float32, 1e-5), (torch.float16, 2e-3), *([(torch.bfloat16, 2e-2)] if CUDA else [])]
CASES = [
    *(
        pytest.param("triton", dtype, tolerance, marks=pytest.mark.skipif(not HAS_TRITON, reason="no triton"))
        for dtype, tolerance in TRITON_DTYPES
    ),
    pytest.param("cpu", torch.float32, 1e-5),
]


def ops_on(backend: str) -> tuple[FusedOps, torch.device]:
    if backend == "triton":
        from worker.triton_fused_ops import TritonFusedOps

        return TritonFusedOps(), torch.device("cuda" if CUDA else "cpu")
    ops = CpuFusedOps.load()
    if ops is None:
        pytest.skip("no C compiler on this machine")
    return ops, torch.device("cpu")


@pytest.mark.parametrize(("backend", "dtype", "tolerance"), CASES)
@pytest.mark.parametrize("family", ["llama", "olmo2", "gemma2"])
def test_rms_norm_and_residual_add_match_the_decoder(
    backend: str, dtype: torch.dtype, tolerance: float, family: str
) -> None:
    ops, device = ops_on(backend)
    torch.manual_seed(0)
    norm = RMSNorm(40, 1e-6, FAMILIES[family]).to(device, dtype)
    torch.nn.init.normal_(norm.weight)
    wide = torch.randn(5, 56, dtype=dtype, device=device)
    x = wide[:, 8:48]  # a strided view, as a split projection is
    out, same = ops.rms_norm(x, None, norm)
    torch.testing.assert_close(out, norm(x), atol=tolerance, rtol=tolerance)
    assert same is x
    residual = torch.randn(5, 40, dtype=dtype, device=device)
    out, total = ops.rms_norm(x, residual, norm)
    assert torch.equal(total, residual + x)  # rounded once, as torch's add
    torch.testing.assert_close(out, norm(residual + x), atol=tolerance, rtol=tolerance)


@pytest.mark.parametrize(("backend", "dtype", "tolerance"), CASES)
@pytest.mark.parametrize("rotary_dim", [16, 8])
@pytest.mark.parametrize("tokens", [7, 40])  # the C kernel spreads 16 rows or more over threads
def test_rotary_matches_the_decoder_rotation_in_place(
    backend: str, dtype: torch.dtype, tolerance: float, rotary_dim: int, tokens: int
) -> None:
    ops, device = ops_on(backend)
    torch.manual_seed(1)
    heads, kv_heads, head_dim = 6, 2, 16
    qkv = torch.randn(tokens, (heads + 2 * kv_heads) * head_dim, dtype=dtype, device=device)
    q = qkv[:, : heads * head_dim].view(tokens, heads, head_dim)
    k = qkv[:, heads * head_dim : (heads + kv_heads) * head_dim].view(tokens, kv_heads, head_dim)
    freqs = torch.randn(tokens, rotary_dim // 2, device=device)
    emb = torch.cat((freqs, freqs), dim=-1)
    rotation = Rotation(emb.cos().to(dtype), emb.sin().to(dtype), rotary_dim)
    expected_q, expected_k = rotation(q.clone()), rotation(k.clone())
    untouched = qkv[:, (heads + kv_heads) * head_dim :].clone()
    ops.rotary_(q, k, rotation.cos, rotation.sin)
    # rounded where torch rounds: in 16 bits, and in float32 on the CPU (float32 stays exact)
    exact = 0.0 if dtype != torch.float32 or backend == "cpu" else tolerance
    torch.testing.assert_close(q, expected_q, atol=exact, rtol=exact)
    torch.testing.assert_close(k, expected_k, atol=exact, rtol=exact)
    assert torch.equal(qkv[:, (heads + kv_heads) * head_dim :], untouched)  # v


@pytest.mark.parametrize(("backend", "dtype", "tolerance"), CASES)
def test_silu_and_mul_matches_the_gated_mlp(backend: str, dtype: torch.dtype, tolerance: float) -> None:
    ops, device = ops_on(backend)
    torch.manual_seed(2)
    x = torch.randn(3, 2 * 1100, dtype=dtype, device=device)  # more than one column block
    gate, up = x.chunk(2, dim=-1)
    expected = torch.nn.functional.silu(gate) * up
    torch.testing.assert_close(ops.silu_and_mul(x), expected, atol=tolerance, rtol=tolerance)


def test_the_c_norm_and_activation_read_and_write_bfloat16_as_torch_casts() -> None:
    """Around a weight-only quantized linear the C ops take and give bfloat16 in place of torch's
    casts: a bfloat16 input counts as its exact float32 value, and the output rounds to nearest
    even, as `.to(torch.bfloat16)` rounds."""
    ops, _ = ops_on("cpu")
    torch.manual_seed(3)
    norm = RMSNorm(40, 1e-6, FAMILIES["llama"])
    torch.nn.init.normal_(norm.weight)
    x = torch.randn(20, 40).bfloat16()  # 16 rows or more: spread over threads
    residual = torch.randn(20, 40)
    expected, expected_total = ops.rms_norm(x.float(), residual, norm)
    out, total = ops.rms_norm(x, residual, norm, torch.bfloat16)
    assert out.dtype == torch.bfloat16 and torch.equal(out, expected.bfloat16())
    assert torch.equal(total, expected_total)
    out, total = ops.rms_norm(x, None, norm, torch.bfloat16)
    assert torch.equal(out, ops.rms_norm(x.float(), None, norm)[0].bfloat16())
    assert total.dtype == torch.float32 and torch.equal(total, x.float())
    gate_up = torch.randn(20, 2 * 300).bfloat16()
    activated = ops.silu_and_mul(gate_up, torch.bfloat16)
    assert torch.equal(activated, ops.silu_and_mul(gate_up.float()).bfloat16())
    assert torch.equal(ops.silu_and_mul(gate_up), ops.silu_and_mul(gate_up.float()))

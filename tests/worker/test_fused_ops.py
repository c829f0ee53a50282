"""The fused Triton kernels of 16-bit CUDA steps against the decoder's own torch ops (RMSNorm in each
family's rounding, RoPE over whole and partial heads of strided q/k views, SiLU-and-multiply).
On CUDA where there is one, else in Triton's interpreter (float32 and float16 there)."""

import pytest
import torch

from worker.families import FAMILIES
from worker.model import RMSNorm, Rotation

pytest.importorskip("triton")

from worker.fused_ops import FusedOps  # noqa: E402

CUDA = torch.cuda.is_available()
DEVICE = torch.device("cuda" if CUDA else "cpu")
DTYPES = [(torch.float32, 1e-5), (torch.float16, 2e-3), *([(torch.bfloat16, 2e-2)] if CUDA else [])]


@pytest.mark.parametrize(("dtype", "tolerance"), DTYPES)
@pytest.mark.parametrize("family", ["llama", "olmo2", "gemma2"])
def test_rms_norm_and_residual_add_match_the_decoder(
    dtype: torch.dtype, tolerance: float, family: str
) -> None:
    torch.manual_seed(0)
    norm = RMSNorm(40, 1e-6, FAMILIES[family]).to(DEVICE, dtype)
    torch.nn.init.normal_(norm.weight)
    wide = torch.randn(5, 56, dtype=dtype, device=DEVICE)
    x = wide[:, 8:48]  # a strided view, as a split projection is
    out, same = FusedOps().rms_norm(x, None, norm)
    torch.testing.assert_close(out, norm(x), atol=tolerance, rtol=tolerance)
    assert same is x
    residual = torch.randn(5, 40, dtype=dtype, device=DEVICE)
    out, total = FusedOps().rms_norm(x, residual, norm)
    assert torch.equal(total, residual + x)  # rounded once, as torch's add
    torch.testing.assert_close(out, norm(residual + x), atol=tolerance, rtol=tolerance)


@pytest.mark.parametrize(("dtype", "tolerance"), DTYPES)
@pytest.mark.parametrize("rotary_dim", [16, 8])
def test_rotary_matches_the_decoder_rotation_in_place(
    dtype: torch.dtype, tolerance: float, rotary_dim: int
) -> None:
    torch.manual_seed(1)
    tokens, heads, kv_heads, head_dim = 7, 6, 2, 16
    qkv = torch.randn(tokens, (heads + 2 * kv_heads) * head_dim, dtype=dtype, device=DEVICE)
    q = qkv[:, : heads * head_dim].view(tokens, heads, head_dim)
    k = qkv[:, heads * head_dim : (heads + kv_heads) * head_dim].view(tokens, kv_heads, head_dim)
    freqs = torch.randn(tokens, rotary_dim // 2, device=DEVICE)
    emb = torch.cat((freqs, freqs), dim=-1)
    rotation = Rotation(emb.cos()[:, None].to(dtype), emb.sin()[:, None].to(dtype), rotary_dim)
    expected_q, expected_k = rotation(q.clone()), rotation(k.clone())
    untouched = qkv[:, (heads + kv_heads) * head_dim :].clone()
    FusedOps().rotary_(q, k, rotation.cos[:, 0], rotation.sin[:, 0])
    exact = 0.0 if dtype != torch.float32 else tolerance  # 16 bits: rounded where torch rounds
    torch.testing.assert_close(q, expected_q, atol=exact, rtol=exact)
    torch.testing.assert_close(k, expected_k, atol=exact, rtol=exact)
    assert torch.equal(qkv[:, (heads + kv_heads) * head_dim :], untouched)  # v


@pytest.mark.parametrize(("dtype", "tolerance"), DTYPES)
def test_silu_and_mul_matches_the_gated_mlp(dtype: torch.dtype, tolerance: float) -> None:
    torch.manual_seed(2)
    x = torch.randn(3, 2 * 1100, dtype=dtype, device=DEVICE)  # more than one column block
    gate, up = x.chunk(2, dim=-1)
    expected = torch.nn.functional.silu(gate) * up
    torch.testing.assert_close(FusedOps().silu_and_mul(x), expected, atol=tolerance, rtol=tolerance)

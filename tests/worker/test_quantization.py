"""Weight-only quantized linears: what each kernel computes, and that int4 keeps a GGUF file's own
Q4_1 groups, which dequantize to the very floats transformers reads from it (and, held by the
kernel in bfloat16, to within bfloat16's rounding of them)."""

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch import nn
from transformers import AutoConfig

from worker.checkpoint_weights import decoder_state
from worker.fetch_model import GGUF_NAME
from worker.gguf_groups import q4_1_groups, unpack_q4_1
from worker.model_config import MoEShape, model_config_from_hf
from worker.moe import MixtureOfExperts
from worker.quantized_linear import (
    GROUP_SIZE,
    DynamicInt8Linear,
    FbgemmInt8Linear,
    Int4Groups,
    Int4Linear,
    Int8Linear,
    quantize_linears,
)


@pytest.fixture()
def linear() -> nn.Linear:
    torch.manual_seed(0)
    return nn.Linear(128, 96, bias=True)


BFLOAT16 = {"rtol": 2**-7, "atol": 1e-3}  # what the kernels take in and give out


def dequantized(groups: Int4Groups) -> torch.Tensor:
    """minimum + scale * code, in float32, as the groups define the weight."""
    scales = groups.scales.repeat_interleave(GROUP_SIZE, 1)
    return groups.codes.float() * scales + groups.minimums.repeat_interleave(GROUP_SIZE, 1)


def in_kernel_precision(groups: Int4Groups) -> torch.Tensor:
    """The weight the int4 kernel computes with: (code - 8) * scale + zero, both in bfloat16."""
    scales = groups.scales.bfloat16().float().repeat_interleave(GROUP_SIZE, 1)
    zeros = (groups.minimums + 8 * groups.scales).bfloat16().float().repeat_interleave(GROUP_SIZE, 1)
    return (groups.codes.float() - 8) * scales + zeros


def test_int8_is_the_weight_rounded_per_output_channel(linear: nn.Linear) -> None:
    layer = Int8Linear(linear.weight.detach(), linear.bias)
    step = layer.scales.float()[:, None]
    dequantized = layer.weight.float() * step
    assert ((dequantized - linear.weight).abs() <= step / 2 + 1e-7).all()
    x = torch.randn(5, 128)
    expected = x.bfloat16().float() @ dequantized.T + linear.bias
    torch.testing.assert_close(layer(x), expected, **BFLOAT16)


def test_int4_groups_span_each_group_in_fifteen_steps(linear: nn.Linear) -> None:
    groups = Int4Groups.of(linear.weight.detach())
    assert groups.scales.shape == (96, 128 // GROUP_SIZE) and int(groups.codes.max()) == 15
    step = groups.scales.repeat_interleave(GROUP_SIZE, 1)
    assert ((dequantized(groups) - linear.weight).abs() <= step / 2 + 1e-6).all()
    assert torch.equal(Int4Groups.of(dequantized(groups)).codes, groups.codes), "its own groups, again"
    layer = Int4Linear(groups, linear.bias)
    x = torch.randn(5, 128)
    expected = x.bfloat16().float() @ in_kernel_precision(groups).T + linear.bias
    torch.testing.assert_close(layer(x), expected, **BFLOAT16)


def test_w8a8_rounds_each_activation_row_on_its_own_scale(linear: nn.Linear) -> None:
    layer = DynamicInt8Linear(linear.weight.detach(), linear.bias)
    x = torch.randn(5, 128)
    x[2] *= 1000  # a row of outliers costs the other rows nothing
    weight = layer.weight_t.T.float() * layer.scales[:, None]
    steps = x.abs().amax(1, keepdim=True) / 127
    expected = (x / steps).round() * steps @ weight.T + linear.bias
    torch.testing.assert_close(layer(x), expected, rtol=1e-5, atol=1e-4)
    error = (layer(x) - linear(x)).abs() / linear(x).abs().amax(1, keepdim=True)
    assert error.max() < 0.05


def test_a_row_gets_the_same_result_in_any_batch(linear: nn.Linear) -> None:
    x = torch.randn(12, 128)
    weight = linear.weight.detach()
    for layer in (
        Int8Linear(weight, None),
        Int4Linear(Int4Groups.of(weight), None),
        DynamicInt8Linear(weight, None),
        FbgemmInt8Linear(weight, None),
    ):
        assert torch.equal(layer(x)[3:4], layer(x[3:4]))


def test_fbgemm_rounds_each_activation_row_on_its_own_scale(linear: nn.Linear) -> None:
    """fbgemm scales a whole batch at once; spanning every row over [-1, 1] makes the scale each
    row's own: a row of outliers, or of zeros, changes no other row's output by a bit."""
    layer = FbgemmInt8Linear(linear.weight.detach(), linear.bias)
    x = torch.randn(6, 128)
    alone = torch.cat([layer(row[None]) for row in x])
    x[2] *= 1000
    x[4] = 0
    batch = layer(x)
    assert torch.equal(batch[[0, 1, 3, 5]], alone[[0, 1, 3, 5]])
    assert torch.equal(batch[4], linear.bias.detach())
    expected = linear(x)
    error = (batch - expected).abs() / expected.abs().amax(1, keepdim=True)
    assert error.max() < 0.05  # seven bits of each row's magnitude, eight of the weights'


def test_weight_only_layers_take_and_give_bfloat16_where_told(linear: nn.Linear) -> None:
    x = torch.randn(3, 128)
    weight = linear.weight.detach()
    for layer in (Int8Linear(weight, None), Int4Linear(Int4Groups.of(weight), None)):
        floats = layer(x)
        assert floats.dtype == torch.float32 and torch.equal(layer(x.bfloat16()), floats)
        layer.bfloat16_out = True
        assert torch.equal(layer(x), floats.bfloat16())


def test_int4_leaves_the_lm_head_at_w8a8_and_odd_inputs_at_int8() -> None:
    model = nn.ModuleDict(
        {"proj": nn.Linear(64, 32), "odd": nn.Linear(40, 32), "lm_head": nn.Linear(64, 100)}
    )
    assert quantize_linears(model, "int4", {}) == {"int8": 1, "int4": 1, "w8a8": 1}
    assert isinstance(model["proj"], Int4Linear) and isinstance(model["odd"], Int8Linear)
    assert isinstance(model["lm_head"], FbgemmInt8Linear)


def test_a_router_stays_float32_where_it_picks_the_experts() -> None:
    shape = MoEShape(num_experts=4, top_k=2, intermediate_size=32, normalize=True, layers=frozenset({0}))
    model = nn.ModuleDict({"mlp": MixtureOfExperts(64, shape, "silu"), "proj": nn.Linear(64, 64)})
    assert quantize_linears(model, "w8a8", {}) == {"int8": 0, "int4": 0, "w8a8": 1}
    assert type(model["mlp"].gate) is nn.Linear


def test_unpacking_follows_the_q4_1_block_layout() -> None:
    block = bytearray(torch.tensor([0.5, -2.0], dtype=torch.float16).numpy().tobytes())
    block += bytes((j % 16) | ((15 - j % 16) << 4) for j in range(16))  # codes j and 15 - j
    codes, scales, minimums = unpack_q4_1(torch.tensor(list(block), dtype=torch.uint8).numpy()[None, :])
    assert codes.tolist() == [[*range(16), *range(15, -1, -1)]]
    assert scales.tolist() == [[0.5]] and minimums.tolist() == [[-2.0]]


def test_the_gguf_groups_dequantize_to_what_transformers_reads(model_dir: Path) -> None:
    """The default model's float32 checkpoint is transformers' dequantization of its GGUF file."""
    hf_config = AutoConfig.from_pretrained(model_dir)
    config = model_config_from_hf(hf_config, model_dir)
    groups = q4_1_groups(model_dir.parent / GGUF_NAME, hf_config, config)
    state = decoder_state(load_file(model_dir / "model.safetensors"), config, {})
    kinds = ("self_attn.qkv_proj", "self_attn.o_proj", "mlp.gate_up_proj", "mlp.down_proj")
    assert set(groups) == {f"layers.{i}.{kind}" for i in range(config.num_layers) for kind in kinds}
    for name, group in groups.items():
        theirs = state[f"{name}.weight"]
        assert torch.equal(dequantized(group), theirs), name
        # The kernel holds the float16 scales and zeros in bfloat16: 8 bits of mantissa, not 11.
        scales = group.scales.repeat_interleave(GROUP_SIZE, 1)
        zeros = (group.minimums + 8 * group.scales).repeat_interleave(GROUP_SIZE, 1)
        bound = (group.codes.float() - 8).abs() * scales + zeros.abs()
        assert ((in_kernel_precision(group) - theirs).abs() <= bound * 2**-8 + 1e-9).all(), name

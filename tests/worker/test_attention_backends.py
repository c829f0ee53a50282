"""Every attention backend this machine has, against one eager reference over the same block tables:
a step mixing decodes, a decode checking drafts, a whole prompt and chunks continuing cached
prompts (one longer than a tile of queries, one reading more keys than the prefill kernel scores
at once), with grouped heads, sliding windows (blocks behind them released) and soft-capped scores.

The Triton backend runs on CUDA where there is one, else in Triton's interpreter (float32 and
float16 there: the interpreter cannot multiply bfloat16 tiles)."""

from collections.abc import Callable

import pytest
import torch

from scheduler import RELEASED
from worker.attention import AttentionBackend, LayerAttention, SequenceRows
from worker.cpu_attention import CpuAttention
from worker.kernels import PagedDecodeKernel
from worker.kernels.prefill import PagedPrefillKernel

BLOCK_SIZE = 4
NUM_BLOCKS = 128
HEAD_DIM = 24  # not a power of two: the kernels pad it
WIDE_HEAD_DIM = 128  # in float32, a head of 512 bytes: the kernel's narrower tiles
TILED_HEAD_DIM = 40  # the C prefill kernel: a tile of 32 dims and 8 one by one
CUDA = torch.cuda.is_available()
DEVICE = torch.device("cuda" if CUDA else "cpu")
# (start_pos, num_new, checks_drafts): decodes first, as the runner packs them
SEQUENCES = [
    (9, 1, False),
    (0, 1, False),
    (30, 1, False),
    (12, 3, True),
    (0, 7, False),
    (16, 9, False),
    (8, 70, False),  # more queries than one tile holds
    (140, 20, False),  # keys past the C prefill kernel's first block of 128
]


def _cpu(decode: bool, prefill: bool) -> Callable[[], AttentionBackend]:
    def make() -> AttentionBackend:
        decode_kernel = PagedDecodeKernel.load() if decode else None
        prefill_kernel = PagedPrefillKernel.load() if prefill else None
        if (decode and decode_kernel is None) or (prefill and prefill_kernel is None):
            pytest.skip("no C compiler on this machine")
        return CpuAttention(BLOCK_SIZE, torch.device("cpu"), decode_kernel, prefill_kernel)

    return make


def _triton() -> AttentionBackend:
    pytest.importorskip("triton")
    from worker.triton_attention import TritonAttention

    return TritonAttention(BLOCK_SIZE, DEVICE)


BACKENDS = {
    "cpu-kernels": _cpu(True, True),
    "cpu-decode-kernel": _cpu(True, False),
    "cpu-sdpa": _cpu(False, False),
    "triton": _triton,
}
CASES = [
    # backend, dtype, tolerance
    ("cpu-kernels", torch.float32, 1e-5),
    ("cpu-decode-kernel", torch.float32, 1e-5),
    ("cpu-sdpa", torch.float32, 1e-5),
    ("cpu-sdpa", torch.bfloat16, 2e-2),  # chunks after cached tokens: a bool mask, not the float32 one
    ("triton", torch.float32, 1e-5),
    ("triton", torch.float16, 2e-3),
    *([("triton", torch.bfloat16, 2e-2)] if CUDA else []),
]


def reference(
    q: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    seqs: list[SequenceRows],
    num_kv_heads: int,
    layer: LayerAttention,
) -> torch.Tensor:
    """Eager attention, in float64, of every row over its sequence's keys gathered slot by slot."""
    num_heads = q.shape[1]
    group = num_heads // num_kv_heads
    out = torch.zeros(q.shape, dtype=torch.float64)
    for seq in seqs:
        for offset in range(seq.num_new):
            row, pos = seq.row_start + offset, seq.start_pos + offset
            first = 0 if layer.window is None else max(0, pos - layer.window + 1)
            slots = [
                seq.block_ids[p // BLOCK_SIZE] * BLOCK_SIZE + p % BLOCK_SIZE for p in range(first, pos + 1)
            ]
            keys = key_cache[slots].double().view(len(slots), num_kv_heads, -1)
            values = value_cache[slots].double().view(len(slots), num_kv_heads, -1)
            for head in range(num_heads):
                scores = keys[:, head // group] @ q[row, head].double() * layer.scale
                if layer.softcap is not None:
                    scores = torch.tanh(scores / layer.softcap) * layer.softcap
                out[row, head] = torch.softmax(scores, dim=0) @ values[:, head // group]
    return out


def _step(num_kv_heads: int, window: int | None, seed: int) -> tuple[list[SequenceRows], list[int]]:
    """Block tables drawn from one shuffled pool; with a window, blocks wholly behind the first
    query's window released, as the scheduler does."""
    generator = torch.Generator().manual_seed(seed)
    pool = torch.randperm(NUM_BLOCKS, generator=generator).tolist()
    seqs, slots, row = [], [], 0
    for start_pos, num_new, drafts in SEQUENCES:
        context_len = start_pos + num_new
        blocks = [pool.pop() for _ in range(-(-context_len // BLOCK_SIZE))]
        if window is not None:
            first_visible = max(0, start_pos - window + 1)
            blocks = [
                RELEASED if (b + 1) * BLOCK_SIZE <= first_visible else block for b, block in enumerate(blocks)
            ]
        seqs.append(SequenceRows(blocks, start_pos, num_new, row, drafts))
        slots += [
            blocks[p // BLOCK_SIZE] * BLOCK_SIZE + p % BLOCK_SIZE for p in range(start_pos, context_len)
        ]
        row += num_new
    return seqs, slots


@pytest.mark.parametrize(
    ("backend_name", "dtype", "tolerance", "head_dim"),
    [(*case, HEAD_DIM) for case in CASES]
    + [("triton", torch.float32, 1e-5, WIDE_HEAD_DIM)]
    + [("cpu-kernels", torch.float32, 1e-5, head_dim) for head_dim in (TILED_HEAD_DIM, WIDE_HEAD_DIM)],
)
@pytest.mark.parametrize(("num_heads", "num_kv_heads"), [(6, 2), (4, 4)])
@pytest.mark.parametrize(("window", "softcap"), [(None, None), (6, None), (None, 3.0)])
def test_backend_matches_eager_attention_over_block_tables(
    backend_name: str,
    dtype: torch.dtype,
    tolerance: float,
    head_dim: int,
    num_heads: int,
    num_kv_heads: int,
    window: int | None,
    softcap: float | None,
) -> None:
    backend = BACKENDS[backend_name]()
    device = backend.device
    seqs, slots = _step(num_kv_heads, window, seed=num_heads)
    num_tokens = len(slots)
    width = num_kv_heads * head_dim
    torch.manual_seed(num_kv_heads)
    key_cache = torch.randn(NUM_BLOCKS * BLOCK_SIZE, width, dtype=dtype, device=device)
    value_cache = torch.randn(NUM_BLOCKS * BLOCK_SIZE, width, dtype=dtype, device=device)
    q = torch.randn(num_tokens, num_heads, head_dim, dtype=dtype, device=device)
    k = torch.randn(num_tokens, width, dtype=dtype, device=device)
    v = torch.randn(num_tokens, width, dtype=dtype, device=device)
    layer = LayerAttention(scale=head_dim**-0.5, window=window, softcap=softcap)
    out = backend.plan(seqs, slots).forward(q, k, v, key_cache, value_cache, num_kv_heads, layer)
    assert out.shape == (num_tokens, num_heads * head_dim) and out.dtype == dtype
    stored = torch.tensor(slots, device=device)
    assert torch.equal(key_cache[stored], k) and torch.equal(value_cache[stored], v)
    expected = reference(q.cpu(), key_cache.cpu(), value_cache.cpu(), seqs, num_kv_heads, layer)
    torch.testing.assert_close(out.cpu().double().view_as(expected), expected, atol=tolerance, rtol=tolerance)


def test_triton_padding_rows_store_nothing_and_see_nothing() -> None:
    """A CUDA graph's padding rows: slot -1 and no keys; real rows and the cache are untouched."""
    backend = _triton()
    device = backend.device
    from worker.triton_attention import TritonAttention

    assert isinstance(backend, TritonAttention)
    width = 2 * HEAD_DIM
    key_cache = torch.randn(NUM_BLOCKS * BLOCK_SIZE, width, device=device)
    value_cache = torch.randn(NUM_BLOCKS * BLOCK_SIZE, width, device=device)
    before = key_cache.clone(), value_cache.clone()
    q = torch.randn(3, 4, HEAD_DIM, device=device)
    k, v = torch.randn(3, width, device=device), torch.randn(3, width, device=device)
    tables = [[5, 7, 0], [0, 0, 0], [0, 0, 0]]
    step = backend.step([29, -1, -1], [0, 1, 2, 3], [6, 0, 0], tables, max_q_len=1)
    layer = LayerAttention(scale=0.25)
    out = step.forward(q, k, v, key_cache, value_cache, 2, layer).view(3, 4, HEAD_DIM)
    assert torch.equal(key_cache[29], k[0]) and torch.equal(value_cache[29], v[0])
    key_cache[29], value_cache[29] = before[0][29], before[1][29]
    assert torch.equal(key_cache, before[0]) and torch.equal(value_cache, before[1])
    assert torch.all(out[1:] == 0)
    seq = SequenceRows([5, 7], 5, 1, 0)
    key_cache[29], value_cache[29] = k[0], v[0]
    expected = reference(q[:1].cpu(), key_cache.cpu(), value_cache.cpu(), [seq], 2, layer)
    torch.testing.assert_close(out[:1].cpu().double(), expected, atol=1e-5, rtol=1e-5)


class _RecordingRotary:
    """RoPE that only notes the dtype it was handed (this test is about the hand-over, not RoPE)."""

    rotary_address = None

    def __init__(self) -> None:
        self.dtypes: list[torch.dtype] = []

    def rotary_(self, q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> None:
        self.dtypes += [q.dtype, k.dtype]


@pytest.mark.parametrize(
    ("given", "asked", "expected"),
    [
        (torch.bfloat16, None, torch.bfloat16),  # a 16-bit model: q/k/v stay as they come
        (torch.bfloat16, torch.float32, torch.float32),  # a weight-only kernel's bfloat16, float32 model
        (torch.float32, torch.float32, torch.float32),
    ],
)
def test_attend_qkv_converts_q_k_v_only_where_asked(
    given: torch.dtype, asked: torch.dtype | None, expected: torch.dtype
) -> None:
    """The seam's default `attend_qkv` (a prompt through the SDPA backend) splits the projection's
    output and converts it only to the dtype the layer asks for."""
    from worker.attention import QkvLayer
    from worker.model import Rotation

    num_heads, num_kv_heads, num_new = 4, 2, 5
    width = (num_heads + 2 * num_kv_heads) * HEAD_DIM
    plan = CpuAttention(BLOCK_SIZE, torch.device("cpu")).plan(
        [SequenceRows([3, 7], 0, num_new, 0)], [3 * BLOCK_SIZE + i for i in range(num_new)]
    )
    ops = _RecordingRotary()
    heads = QkvLayer(num_heads, num_kv_heads, HEAD_DIM, LayerAttention(0.3), ops, torch.float32, asked)  # type: ignore[arg-type]
    cache = torch.zeros(NUM_BLOCKS * BLOCK_SIZE, num_kv_heads * HEAD_DIM, dtype=expected)
    rotation = Rotation(torch.ones(num_new, HEAD_DIM), torch.zeros(num_new, HEAD_DIM), HEAD_DIM)
    out = plan.attend_qkv(torch.randn(num_new, width).to(given), rotation, cache, cache.clone(), heads)
    assert ops.dtypes == [expected, expected] and out.dtype == expected

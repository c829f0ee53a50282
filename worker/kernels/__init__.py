"""PagedDecodeKernel: the C decode-attention kernel, compiled once per machine, on torch's OpenMP threads.

It is built with the system C compiler on first use (about a second) into a cache folder keyed by
the source, the compiler and the CPU's flags, so `-march=native` never runs on the wrong CPU.
Without a compiler the engine falls back to gathering the context and calling SDPA.
"""

import ctypes
import hashlib
import logging
import os
import shutil
import subprocess
from pathlib import Path
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from worker.attention import LayerAttention

logger = logging.getLogger(__name__)

_SOURCE = Path(__file__).with_name("paged_decode_attention.c")
_I64 = ctypes.c_int64


def _cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "conveyor" / "kernels"


def _cpu_flags() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return line
    except OSError:
        pass
    return ""


def _build(compiler: str) -> Path:
    source = _SOURCE.read_bytes()
    version = subprocess.run([compiler, "--version"], capture_output=True, check=True).stdout
    key = hashlib.sha256(source + version + _cpu_flags().encode()).hexdigest()[:16]
    library = _cache_dir() / f"paged_decode_attention-{key}.so"
    if not library.exists():
        library.parent.mkdir(parents=True, exist_ok=True)
        partial = library.with_suffix(f".{os.getpid()}.tmp")
        subprocess.run(
            [
                compiler,
                "-O3",
                "-march=native",
                "-fopenmp",
                "-shared",
                "-fPIC",
                "-o",
                str(partial),
                str(_SOURCE),
                "-lm",
            ],
            check=True,
            capture_output=True,
        )
        partial.replace(library)
    return library


class PagedDecodeKernel:
    """Decode attention read in place from the paged cache."""

    def __init__(self, library: Path):
        self._function = ctypes.CDLL(str(library)).paged_decode_attention
        self._function.restype = ctypes.c_int
        self._function.argtypes = [ctypes.c_void_p] * 6 + [_I64] * 7 + [ctypes.c_float] * 2

    @classmethod
    def load(cls) -> "PagedDecodeKernel | None":
        """The compiled kernel, or None (with a log line) where it cannot be built."""
        compiler = os.environ.get("CC") or shutil.which("gcc") or shutil.which("cc")
        if compiler is None:
            logger.info("no C compiler: decode attention uses gather + SDPA")
            return None
        try:
            return cls(_build(compiler))
        except (OSError, subprocess.CalledProcessError) as error:
            logger.warning("decode attention kernel unavailable (%s): using gather + SDPA", error)
            return None

    def __call__(
        self,
        q: torch.Tensor,  # [num_seqs, num_heads, head_dim], contiguous float32 on CPU
        key_cache: torch.Tensor,  # [num_slots, num_kv_heads * head_dim]
        value_cache: torch.Tensor,
        block_tables: torch.Tensor,  # [num_seqs, max_blocks] int64
        context_lens: torch.Tensor,  # [num_seqs] int64
        num_kv_heads: int,
        block_size: int,
        layer: "LayerAttention",
    ) -> torch.Tensor:  # [num_seqs, num_heads, head_dim]
        num_seqs, num_heads, head_dim = q.shape
        assert num_heads % num_kv_heads == 0 and q.is_contiguous()
        out = torch.empty_like(q)
        status = self._function(
            q.data_ptr(),
            key_cache.data_ptr(),
            value_cache.data_ptr(),
            block_tables.data_ptr(),
            context_lens.data_ptr(),
            out.data_ptr(),
            num_seqs,
            num_heads,
            num_kv_heads,
            head_dim,
            block_size,
            block_tables.shape[1],
            layer.window or 0,
            layer.scale,
            layer.softcap or 0.0,
        )
        if status != 0:
            raise MemoryError("paged_decode_attention could not allocate its scratch space")
        return out

"""PagedDecodeKernel: the C decode-attention kernel, compiled once per machine and run on CPU threads.

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
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

logger = logging.getLogger(__name__)

_SOURCE = Path(__file__).with_name("paged_decode_attention.c")
_MAX_GROUP = 64  # query heads per KV head the kernel's stack arrays hold
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
                "-fopenmp-simd",
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
    """Decode attention read in place from the paged cache, split over `num_threads` threads."""

    def __init__(self, library: Path, num_threads: int):
        self._function = ctypes.CDLL(str(library)).paged_decode_attention  # CDLL calls release the GIL
        self._function.restype = ctypes.c_int
        self._function.argtypes = [ctypes.c_void_p] * 6 + [_I64] * 7 + [ctypes.c_float]
        self.num_threads = max(num_threads, 1)
        self._pool = ThreadPoolExecutor(self.num_threads - 1) if self.num_threads > 1 else None

    @classmethod
    def load(cls, num_threads: int) -> "PagedDecodeKernel | None":
        """The compiled kernel, or None (with a log line) where it cannot be built."""
        compiler = os.environ.get("CC") or shutil.which("gcc") or shutil.which("cc")
        if compiler is None:
            logger.info("no C compiler: decode attention uses gather + SDPA")
            return None
        try:
            return cls(_build(compiler), num_threads)
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
        split_points: list[int],  # sequence boundaries between threads, len num_threads + 1
        num_kv_heads: int,
        block_size: int,
    ) -> torch.Tensor:  # [num_seqs, num_heads, head_dim]
        num_seqs, num_heads, head_dim = q.shape
        assert num_heads // num_kv_heads <= _MAX_GROUP
        out = torch.empty_like(q)
        args = (
            q.data_ptr(),
            key_cache.data_ptr(),
            value_cache.data_ptr(),
            block_tables.data_ptr(),
            context_lens.data_ptr(),
            out.data_ptr(),
        )
        shape = (num_heads, num_kv_heads, head_dim, block_size, block_tables.shape[1], head_dim**-0.5)
        ranges = list(zip(split_points[:-1], split_points[1:], strict=True))
        futures = (
            [self._pool.submit(self._run, args, begin, end, shape) for begin, end in ranges[1:]]
            if self._pool
            else []
        )
        self._run(args, *ranges[0], shape)
        for future in futures:
            future.result()
        return out

    def _run(
        self, args: tuple[int, ...], begin: int, end: int, shape: tuple[int, int, int, int, int, float]
    ) -> None:
        if begin < end and self._function(*args, begin, end, *shape) != 0:
            raise MemoryError("paged_decode_attention could not allocate its scratch space")

    def split(self, context_lens: list[int]) -> list[int]:
        """Sequence boundaries that give each thread about the same number of keys to read."""
        total = sum(context_lens)
        points = [0]
        running = 0
        for index, length in enumerate(context_lens):
            running += length
            if len(points) < self.num_threads and running >= total * len(points) / self.num_threads:
                points.append(index + 1)
        while len(points) < self.num_threads + 1:
            points.append(len(context_lens))
        points[-1] = len(context_lens)
        return points

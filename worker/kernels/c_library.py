"""The project's C kernels, compiled once per machine with the system C compiler.

A kernel is built on first use (about a second) into a cache folder keyed by its source (and the
headers beside it), its flags, the compiler and the CPU's flags, so `-march=native` never runs on
the wrong CPU. Where there is no compiler, or the build fails, the caller gets None and keeps its
torch path.
"""

import ctypes
import hashlib
import logging
import os
import shutil
import subprocess
from pathlib import Path

logger = logging.getLogger(__name__)

_COMPILE = ("-O3", "-march=native", "-fopenmp", "-fPIC")
# Linked apart from compiling: a -ffast-math link would add crtfastmath, which flushes subnormals
# to zero for the whole process (torch's arithmetic too) as soon as the library loads.
_LINK = ("-shared", "-fopenmp")


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


def _build(compiler: str, source: Path, flags: tuple[str, ...]) -> Path:
    version = subprocess.run([compiler, "--version"], capture_output=True, check=True).stdout
    headers = [header.read_bytes() for header in sorted(source.parent.glob("*.h"))]  # what it may include
    key_parts = [
        source.read_bytes(),
        *headers,
        " ".join(flags + _LINK).encode(),
        version,
        _cpu_flags().encode(),
    ]
    key = hashlib.sha256(b"\0".join(key_parts)).hexdigest()[:16]
    library = _cache_dir() / f"{source.stem}-{key}.so"
    if not library.exists():
        library.parent.mkdir(parents=True, exist_ok=True)
        partial = library.with_suffix(f".{os.getpid()}.tmp")
        objects = partial.with_suffix(".o")
        try:
            subprocess.run(
                [compiler, *flags, "-c", "-o", str(objects), str(source)], check=True, capture_output=True
            )
            subprocess.run(
                [compiler, *_LINK, "-o", str(partial), str(objects), "-lm"], check=True, capture_output=True
            )
        finally:
            objects.unlink(missing_ok=True)
        partial.replace(library)
    return library


def load_c_library(source: Path, fallback: str, extra_flags: tuple[str, ...] = ()) -> ctypes.CDLL | None:
    """`source` compiled and loaded, or None with a log line saying `fallback` (what runs instead)."""
    compiler = os.environ.get("CC") or shutil.which("gcc") or shutil.which("cc")
    if compiler is None:
        logger.info("no C compiler: %s", fallback)
        return None
    try:
        return ctypes.CDLL(str(_build(compiler, source, _COMPILE + extra_flags)))
    except (OSError, subprocess.CalledProcessError) as error:
        logger.warning("%s unavailable (%s): %s", source.stem, error, fallback)
        return None


def function_address(function: "ctypes._CFuncPtr") -> int:
    """Where a loaded C function is, for another C function to call it."""
    address = ctypes.cast(function, ctypes.c_void_p).value
    assert address is not None
    return address

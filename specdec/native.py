"""specdec's own native kernels: C sources under ``specdec/csrc``, compiled on first use, called through ctypes.

The kernels here: the small-row linear kernel (``csrc/rows.c``: fp32, and
bf16/fp16), the same walk over a GGUF model's quantized blocks
(``csrc/quant.c``) and a row-invariant attention (``csrc/attn.c``); see their
headers, :mod:`specdec.kernels`, :mod:`specdec.quant` and
:mod:`specdec.tree_attention.own`. It is built with the machine's own C compiler
(``$CC``, else ``cc``/``gcc``) for the machine's own CPU (``-march=native``)
into ``<cache>/native/`` (``$SPECDEC_CACHE``, else ``~/.cache/specdec``),
keyed by the source, the flags and the CPU, so a later process loads it in
milliseconds. The build goes to a temporary file that is renamed into place
only when complete: an interrupted build leaves nothing half-written.

Where there is no compiler, no AVX-512, or the build fails, :func:`rows_linear_lib`
returns None (the reason is in :func:`unavailable_reason`) and the engine
keeps to the BLAS kernels: nothing else depends on this module.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
from functools import lru_cache
from pathlib import Path

__all__ = ["rows_linear_lib", "rows_half_lib", "quant_linear_lib", "attention_lib", "unavailable_reason", "native_dir"]

_SOURCE = Path(__file__).with_name("csrc") / "rows.c"
_QUANT_SOURCE = Path(__file__).with_name("csrc") / "quant.c"
_ATTN_SOURCE = Path(__file__).with_name("csrc") / "attn.c"
_FLAGS = ["-O3", "-march=native", "-fopenmp", "-shared", "-fPIC"]
_reason: str | None = None


def native_dir() -> Path:
    """Where built libraries are kept."""
    from specdec.models import cache_root

    return cache_root() / "native"


def _cpu_flags() -> set[str]:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def _compiler() -> str | None:
    for name in filter(None, (os.environ.get("CC"), "cc", "gcc", "clang")):
        path = shutil.which(name)
        if path:
            return path
    return None


def unavailable_reason() -> str | None:
    """Why the native kernel cannot be used here (None when it can, or before the first attempt)."""
    return _reason


def _build(source: Path):
    """Compile ``source`` for this CPU (once; cached) and load it, or return None with the reason set."""
    global _reason
    if platform.machine().lower() not in ("x86_64", "amd64"):
        _reason = f"the kernels are written for x86-64 with AVX-512; this machine is {platform.machine()}"
        return None
    flags = _cpu_flags()
    if "avx512f" not in flags:
        _reason = "this CPU has no AVX-512"
        return None
    if os.environ.get("SPECDEC_NATIVE", "1") == "0":
        _reason = "switched off by SPECDEC_NATIVE=0"
        return None
    cc = _compiler()
    if cc is None:
        _reason = "no C compiler found (set CC, or install gcc)"
        return None
    code = source.read_bytes() + b"".join(h.read_bytes() for h in sorted(source.parent.glob("*.h")))  # headers it may include
    key = hashlib.sha256(code + " ".join([cc, *_FLAGS]).encode() + " ".join(sorted(flags)).encode()).hexdigest()[:16]
    target = native_dir() / f"{source.stem}-{key}.so"
    if not target.exists():
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(suffix=".so", dir=target.parent)
        os.close(fd)
        try:
            done = subprocess.run([cc, *_FLAGS, str(source), "-o", tmp], capture_output=True, text=True, timeout=120)
            if done.returncode != 0:
                _reason = f"building {source.name} failed: {done.stderr.strip()[-400:]}"
                return None
            os.replace(tmp, target)
        except (OSError, subprocess.SubprocessError) as err:
            _reason = f"building {source.name} failed: {err}"
            return None
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
    try:
        lib = ctypes.CDLL(str(target))
    except OSError as err:
        _reason = f"loading {target} failed: {err}"
        return None
    _reason = None
    return lib


def _rows_lib():
    return _build(_SOURCE)  # built once; each public getter below caches its own function


@lru_cache(maxsize=1)
def rows_linear_lib():
    """The loaded small-row kernel (a ``ctypes`` function ``(x, w, bias, y, M, N, K, threads) -> int``), or None."""
    lib = _rows_lib()
    if lib is None:
        return None
    fn = lib.specdec_rows_linear
    fn.argtypes = [ctypes.c_void_p] * 4 + [ctypes.c_int64] * 3 + [ctypes.c_int]
    fn.restype = ctypes.c_int
    return fn


@lru_cache(maxsize=1)
def rows_half_lib():
    """The bf16/fp16 variant of the small-row kernel: ``(kind, x, w, bias, y, M, N, K, threads) -> int`` with kind 0
    for bf16 and 1 for fp16 (inputs and weights of that type, fp32 output), or None."""
    lib = _rows_lib()
    if lib is None:
        return None
    fn = lib.specdec_rows_linear_half
    fn.argtypes = [ctypes.c_int] + [ctypes.c_void_p] * 4 + [ctypes.c_int64] * 3 + [ctypes.c_int]
    fn.restype = ctypes.c_int
    return fn


@lru_cache(maxsize=1)
def attention_lib():
    """The row-invariant attention kernel (``csrc/attn.c``): ``(kind, q, k, v, mask, out, B, Hq, Hkv, N, S, D,
    q_strides, k_strides, v_strides, mask_b_stride, scale, threads) -> int``, or None."""
    lib = _build(_ATTN_SOURCE)
    if lib is None:
        return None
    fn = lib.specdec_attention
    fn.argtypes = ([ctypes.c_int] + [ctypes.c_void_p] * 5 + [ctypes.c_int64] * 6 + [ctypes.c_void_p] * 3
                   + [ctypes.c_int64, ctypes.c_float, ctypes.c_int])
    fn.restype = ctypes.c_int
    return fn


@lru_cache(maxsize=1)
def quant_linear_lib():
    """The loaded quantized-block kernel (``csrc/quant.c``): a ``ctypes`` function
    ``(fmt, x, w, bias, y, M, N, K, threads) -> int``, or None (reason in :func:`unavailable_reason`)."""
    lib = _build(_QUANT_SOURCE)
    if lib is None:
        return None
    if "avx512bw" not in _cpu_flags() or "f16c" not in _cpu_flags():
        global _reason
        _reason = "the quantized kernel needs AVX-512 BW and F16C"
        return None
    fn = lib.specdec_quant_linear
    fn.argtypes = [ctypes.c_int] + [ctypes.c_void_p] * 4 + [ctypes.c_int64] * 3 + [ctypes.c_int]
    fn.restype = ctypes.c_int
    return fn

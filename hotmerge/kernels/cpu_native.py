"""The native CPU kernel (cpu_merge.c): compiled with the machine's C compiler at first
use, cached, and called through ctypes from as many threads as torch uses.

torch runs the element-wise merge as ~10 separate passes over cache-sized blocks;
the C kernel does the same float32 operations per element in one pass, so results
are bit-identical while the time approaches the memory-copy floor. It covers bf16
sources for linear and slerp (`combine`) and for sums of deltas (`merge`): plain
(task_arithmetic), with TIES' sign consensus, magnitude-range masks (ties,
breadcrumbs) and DARE's random masks, up to MAX_ROWS models; nearswap, sce, ram and
ramplus_tl in branches of their own. cpu_backend.py uses it when
`available()` and falls back to its torch path otherwise (DELLA's ranked masks, fp16).

HOTMERGE_NATIVE=0 turns it off. The shared library is cached under
$HOTMERGE_CACHE (default ~/.cache/hotmerge)/kernels, keyed by the source, the
compiler and the CPU's flags (it is built with -march=native).
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import shutil
import subprocess
import tempfile
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Optional, Sequence

import torch

SOURCE = Path(__file__).with_name("cpu_merge.c")
# -fno-trapping-math lets the float selects (clamps, maxima) vectorise: it drops only the
# floating-point exception flags, never a value (no reassociation, no contraction)
FLAGS = ["-O3", "-march=native", "-ffp-contract=off", "-fno-fast-math", "-fno-trapping-math", "-fPIC", "-shared"]
MIN_PER_THREAD = 1 << 16  # elements; below this, threads cost more than they save
MAX_ROWS, MAX_PARTS = 16, 4  # as in cpu_merge.c

_lock = threading.Lock()
_lib = None
_failure: Optional[str] = None
_pool: Optional[ThreadPoolExecutor] = None
_pool_size = 0


def _cpu_flags() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return line
    except OSError:
        pass
    return ""


def _compiler() -> Optional[str]:
    for name in (os.environ.get("CC"), "cc", "gcc", "clang"):
        if name and shutil.which(name):
            return shutil.which(name)
    return None


def _build() -> ctypes.CDLL:
    cc = _compiler()
    if cc is None:
        raise RuntimeError("no C compiler found (set CC)")
    version = subprocess.run([cc, "--version"], capture_output=True, text=True).stdout
    source = SOURCE.read_bytes()
    key = hashlib.sha256(source + version.encode() + " ".join(FLAGS).encode() + _cpu_flags().encode())
    cache = Path(os.environ.get("HOTMERGE_CACHE", Path.home() / ".cache" / "hotmerge")) / "kernels"
    target = cache / f"cpu_merge-{key.hexdigest()[:16]}.so"
    if not target.exists():
        cache.mkdir(parents=True, exist_ok=True)
        # Build beside the target and rename: concurrent ranks never load a partial file.
        fd, tmp = tempfile.mkstemp(suffix=".so", dir=cache)
        os.close(fd)
        try:
            done = subprocess.run([cc, *FLAGS, str(SOURCE), "-o", tmp], capture_output=True, text=True)
            if done.returncode != 0:
                raise RuntimeError(f"{cc} failed: {done.stderr.strip()[:500]}")
            os.replace(tmp, target)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
    lib = ctypes.CDLL(str(target))
    u16pp = ctypes.POINTER(ctypes.c_void_p)
    f32p = ctypes.POINTER(ctypes.c_float)
    lib.hm_combine_bf16.argtypes = [u16pp, f32p, ctypes.c_int, ctypes.c_int, ctypes.c_float,
                                    ctypes.c_void_p, ctypes.c_int64]
    lib.hm_merge_bf16.argtypes = [ctypes.c_void_p, u16pp, ctypes.c_void_p, ctypes.c_int64,
                                  ctypes.c_void_p, ctypes.c_int64]
    lib.hm_l1_bf16.argtypes = [ctypes.c_void_p, u16pp, ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64,
                               ctypes.POINTER(ctypes.c_double)]
    lib.hm_nearswap_bf16.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_float, ctypes.c_void_p,
                                     ctypes.c_int64]
    lib.hm_keep_bf16.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p,
                                 ctypes.c_int64]
    i32p = ctypes.POINTER(ctypes.c_int32)
    lib.hm_sce_bf16.argtypes = [u16pp, ctypes.c_int, ctypes.c_void_p, f32p, i32p, ctypes.c_uint32, ctypes.c_uint32,
                                ctypes.c_int64, ctypes.c_void_p, ctypes.c_int64]
    lib.hm_ram_bf16.argtypes = [u16pp, ctypes.c_int, ctypes.c_void_p, f32p, ctypes.c_int32, ctypes.c_int,
                                ctypes.c_void_p, ctypes.c_int64]
    lib.hm_combine_bf16.restype = lib.hm_merge_bf16.restype = lib.hm_l1_bf16.restype = None
    lib.hm_nearswap_bf16.restype = lib.hm_sce_bf16.restype = lib.hm_ram_bf16.restype = None
    lib.hm_keep_bf16.restype = None
    return lib


def library() -> Optional[ctypes.CDLL]:
    """The compiled kernel, or None (disabled, or no compiler: see `failure()`)."""
    global _lib, _failure
    if os.environ.get("HOTMERGE_NATIVE", "1") == "0":
        return None
    if _lib is not None or _failure is not None:
        return _lib
    with _lock:
        if _lib is None and _failure is None:
            try:
                _lib = _build()
            except Exception as exc:  # no compiler, or it failed: the torch path is used
                _failure = str(exc)
                logging.getLogger("hotmerge").warning(
                    "the native CPU merge kernel could not be built (%s); merges use the slower "
                    "torch path (install a C compiler, or set HOTMERGE_NATIVE=0 to silence this)", _failure)
    return _lib


def available() -> bool:
    return library() is not None


def failure() -> Optional[str]:
    """Why the kernel could not be built, if it could not."""
    library()
    return _failure


def _parallel(n: int, call) -> None:
    """call(lo, hi) over [0, n), split over torch's thread count (ctypes drops the GIL)."""
    global _pool, _pool_size
    threads = max(1, min(torch.get_num_threads(), n // MIN_PER_THREAD))
    if threads == 1:
        call(0, n)
        return
    if _pool_size < threads:
        _pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="hotmerge-native")
        _pool_size = threads
    step = -(-n // threads)
    step += -step % 64  # whole cache lines per thread
    futures = [_pool.submit(call, lo, min(n, lo + step)) for lo in range(0, n, step)]
    for f in futures:
        f.result()


def _pointers(rows: Sequence[torch.Tensor], offset: int):
    """A C array of row pointers, each advanced by `offset` elements."""
    return (ctypes.c_void_p * len(rows))(*(r.data_ptr() + 2 * offset for r in rows))


def _floats(values: Sequence[float]):
    return (ctypes.c_float * len(values))(*values)


def combine(rows: Sequence[torch.Tensor], coef: Sequence[float], fix: bool, div: float,
            out: torch.Tensor) -> None:
    """out <- bf16((sum_i rows[i] * coef[i] [+ 0.0]) / div); 1-D contiguous bf16, len(rows) >= 1."""
    lib = library()
    c = _floats(coef)

    def call(lo, hi):
        lib.hm_combine_bf16(_pointers(rows, lo), c, len(rows), int(fix), div,
                            out.data_ptr() + 2 * lo, hi - lo)

    _parallel(out.numel(), call)


def nearswap(x: torch.Tensor, base: torch.Tensor, t: float, out: torch.Tensor) -> None:
    """out <- bf16(B + d * clamp(t / max(|d|, 1e-6), 0, 1)), d = bf16(x - B); 1-D contiguous bf16."""
    lib = library()

    def call(lo, hi):
        lib.hm_nearswap_bf16(x.data_ptr() + 2 * lo, base.data_ptr() + 2 * lo, t, out.data_ptr() + 2 * lo, hi - lo)

    _parallel(out.numel(), call)


def keep(x: torch.Tensor, base: torch.Tensor, codes: torch.Tensor, out: torch.Tensor) -> None:
    """out <- bf16(B + (codes ? d : 0)), d = bf16(x - B): arcee_fusion; 1-D contiguous bf16,
    codes uint8."""
    lib = library()

    def call(lo, hi):
        lib.hm_keep_bf16(x.data_ptr() + 2 * lo, base.data_ptr() + 2 * lo, codes.data_ptr() + lo,
                         out.data_ptr() + 2 * lo, hi - lo)

    _parallel(out.numel(), call)


def sce(rows: Sequence[torch.Tensor], base: torch.Tensor, weights: Sequence[float], cut: Sequence[int],
        k1: int, mult: int, elem0: int, out: torch.Tensor) -> None:
    """out <- sce of the rows (cpu_merge.c hm_sce_bf16); cut: (lo, hi, q_lo, q_hi) of the variance
    keys; (k1, mult): the tie rule's random stream, elem0 the hash index of out[0]."""
    lib = library()
    w, c = _floats(weights), (ctypes.c_int32 * 4)(*cut)

    def call(lo, hi):
        lib.hm_sce_bf16(_pointers(rows, lo), len(rows), base.data_ptr() + 2 * lo, w, c, k1 & 0xFFFFFFFF,
                        mult & 0xFFFFFFFF, elem0 + lo, out.data_ptr() + 2 * lo, hi - lo)

    _parallel(out.numel(), call)


def ram(rows: Sequence[torch.Tensor], base: torch.Tensor, lambdas: Sequence[float], threshold: int, plus: bool,
        out: torch.Tensor) -> None:
    """out <- RAM (plus: RAM+) of the rows (cpu_merge.c hm_ram_bf16); a delta counts where its key > threshold."""
    lib = library()
    lam = _floats(lambdas)

    def call(lo, hi):
        lib.hm_ram_bf16(_pointers(rows, lo), len(rows), base.data_ptr() + 2 * lo, lam, threshold, int(plus),
                        out.data_ptr() + 2 * lo, hi - lo)

    _parallel(out.numel(), call)


class MergePlan(ctypes.Structure):
    """hm_plan of cpu_merge.c: one segment's delta merge (filled by cpu_backend._native_plan)."""

    _fields_ = [
        ("k", ctypes.c_int), ("scale", ctypes.c_float * MAX_ROWS),
        ("consensus", ctypes.c_int), ("normalize", ctypes.c_int), ("weight", ctypes.c_float * MAX_ROWS),
        ("w_pos", ctypes.c_int), ("w_min", ctypes.c_float),
        ("fix", ctypes.c_int), ("div", ctypes.c_float), ("lam", ctypes.c_float),
        ("mask", ctypes.c_int), ("need_lo", ctypes.c_int), ("need_hi", ctypes.c_int), ("n_parts", ctypes.c_int),
        ("am1", ctypes.c_int32 * MAX_ROWS), ("nb1", ctypes.c_int32 * MAX_ROWS),
        ("part_key", ctypes.c_int32 * MAX_ROWS * MAX_PARTS), ("part_q", ctypes.c_int32 * MAX_ROWS * MAX_PARTS),
        ("p0", ctypes.c_int32 * MAX_ROWS), ("k1", ctypes.c_int32 * MAX_ROWS), ("mult", ctypes.c_int32 * MAX_ROWS),
    ]


def merge(plan: MergePlan, rows: Sequence[torch.Tensor], base: torch.Tensor, elem0: int,
          out: torch.Tensor) -> None:
    """out <- the merged segment (1-D contiguous bf16); elem0: the hash index of out[0]."""
    lib = library()

    def call(lo, hi):
        lib.hm_merge_bf16(ctypes.byref(plan), _pointers(rows, lo), base.data_ptr() + 2 * lo, elem0 + lo,
                          out.data_ptr() + 2 * lo, hi - lo)

    _parallel(out.numel(), call)


def l1(plan: MergePlan, rows: Sequence[torch.Tensor], base: torch.Tensor, elem0: int) -> list:
    """Per row, the float64 sum of |masked delta| (plan's masks; its merge fields unused).

    Threads sum their parts, which are then added: callers use this only where every
    summation order gives the same value (cpu_backend._l1_sum_is_exact)."""
    lib = library()
    n = base.numel()
    parts = []

    def call(lo, hi):
        sums = (ctypes.c_double * MAX_ROWS)()
        lib.hm_l1_bf16(ctypes.byref(plan), _pointers(rows, lo), base.data_ptr() + 2 * lo, elem0 + lo,
                       hi - lo, sums)
        parts.append(list(sums)[:plan.k])

    _parallel(n, call)
    return [sum(col) for col in zip(*parts)]

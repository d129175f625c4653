"""Run a C callback on torch's own OpenMP threads (``GOMP_parallel``), the threads torch uses.

Why not numba's thread pools or Python threads: between its parallel regions torch's OpenMP
workers spin-wait on the other cores, so a second pool's threads compete with them and a
parallel quantizer ran no faster than a serial one inside a training step. Handing the work to
the same OpenMP runtime (the one torch loaded) makes it one more parallel region for those
threads, as ``at::parallel_for`` does.

Available where torch's ATen parallel backend is OpenMP and its runtime exports the GNU
``GOMP_parallel`` entry point (libgomp; LLVM's libomp exports it too) and can be found among
the loaded libraries (Linux, via ``/proc/self/maps``). Elsewhere ``openmp_parallel`` is None
and callers run the callback on the calling thread.
"""

from __future__ import annotations

import ctypes
import functools
import os
from array import array
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

_RUNTIME_PREFIXES = ("libgomp", "libomp", "libiomp")


def _loaded_runtimes() -> list[Path]:
    """OpenMP runtime libraries mapped into this process (Linux only)."""
    try:
        with open("/proc/self/maps") as maps:
            paths = {line.split()[-1] for line in maps if "/" in line}
    except OSError:
        return []
    return sorted(Path(p) for p in paths if Path(p).name.startswith(_RUNTIME_PREFIXES))


def _torch_runtime() -> Path | None:
    """The OpenMP runtime torch runs on: the one in torch's lib folder, else the only one."""
    if "parallel backend: OpenMP" not in torch.__config__.parallel_info():
        return None
    runtimes = _loaded_runtimes()
    torch_lib = Path(torch.__file__).resolve().parent / "lib"
    own = [p for p in runtimes if p.resolve().parent == torch_lib]
    if own:
        return own[0]
    return runtimes[0] if len(runtimes) == 1 else None


@functools.cache
def openmp_parallel() -> Callable[[int, int, int], None] | None:
    """``run(fn_address, data_address, num_threads)`` on torch's OpenMP pool, or None."""
    if os.environ.get("LOWPREC_SERIAL_KERNELS"):
        return None
    path = _torch_runtime()
    if path is None:
        return None
    try:
        gomp_parallel = ctypes.CDLL(str(path)).GOMP_parallel
    except (OSError, AttributeError):
        return None
    gomp_parallel.argtypes = (ctypes.c_void_p, ctypes.c_void_p, ctypes.c_uint, ctypes.c_uint)
    gomp_parallel.restype = None

    def run(fn_address: int, data_address: int, num_threads: int) -> None:
        gomp_parallel(fn_address, data_address, num_threads, 0)

    return run


def run_worker(worker: Any, args: array, threads: int) -> None:
    """Run a compiled ``void(void*)`` callback (a numba ``cfunc``) on the int64 argument
    vector ``args``: on ``threads`` of torch's OpenMP threads when there are several and the
    runtime is available, else on the calling thread. The callback shares out the work."""
    address = args.buffer_info()[0]
    parallel = openmp_parallel() if threads > 1 else None
    if parallel is not None:
        parallel(worker.address, address, threads)
    else:
        worker.ctypes(address)

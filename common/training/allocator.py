"""Keep freed heap memory in the process (glibc ``mallopt``) so training steps stop page-faulting.

PyTorch's CPU tensors come from the C library's ``malloc``. With glibc's default (dynamic)
thresholds, the free memory at the top of the heap is handed back to the kernel whenever it
exceeds twice the largest recently freed block, and the next step touches it again: each
4 KiB page costs a page fault. A plain training step of the default cnn reuses its memory
and takes no page fault; a DP-SGD step (Opacus: captured activations, rescaled backprops,
per-sample gradients) frees more at once and took 700-22,000 page faults per step on the
benchmark machine (cnn, 28-64 px), a third to a half of its extra time over a plain step
once the per-sample gradients were fast (``docs/benchmarks.md``).

:func:`retain_freed_memory` fixes the thresholds: blocks up to ``mmap_threshold`` come from
the heap, and up to ``trim_threshold`` of free heap is kept for reuse. The process's memory
use does not grow past its peak; it just does not shrink after a step. Process-wide and
idempotent; a no-op (returning ``False``) where the C library is not glibc.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import platform

__all__ = ["MMAP_THRESHOLD", "TRIM_THRESHOLD", "retain_freed_memory"]

log = logging.getLogger(__name__)

#: Blocks below this come from the heap (glibc's ceiling for ``M_MMAP_THRESHOLD``: 32 MiB).
MMAP_THRESHOLD = 32 * 1024 * 1024
#: Free heap kept for reuse instead of being returned to the kernel.
TRIM_THRESHOLD = 512 * 1024 * 1024

_M_TRIM_THRESHOLD = -1  # glibc <malloc.h>
_M_MMAP_THRESHOLD = -3

_applied: tuple[int, int] | None = None


def retain_freed_memory(
    mmap_threshold: int = MMAP_THRESHOLD, trim_threshold: int = TRIM_THRESHOLD
) -> bool:
    """Set glibc's ``M_MMAP_THRESHOLD`` and ``M_TRIM_THRESHOLD`` for this process.

    Parameters
    ----------
    mmap_threshold : int
        Bytes; larger blocks are mapped (and unmapped on free) individually.
    trim_threshold : int
        Bytes of free memory at the top of the heap kept before trimming.

    Returns
    -------
    bool
        ``True`` if the thresholds are in force (set now or by an earlier call).

    """
    global _applied
    wanted = (int(mmap_threshold), int(trim_threshold))
    if _applied == wanted:
        return True
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        ok = bool(libc.mallopt(_M_MMAP_THRESHOLD, wanted[0])) and bool(
            libc.mallopt(_M_TRIM_THRESHOLD, wanted[1])
        )
    except (OSError, AttributeError) as exc:
        log.debug("mallopt unavailable: %s", exc)
        return False
    if ok:
        _applied = wanted
    return ok

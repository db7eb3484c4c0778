"""Process pools for per-case work (preprocessing, evaluation): spawned, one core each, gone with their parent.

* **spawned**, never forked: the parent may hold threads (zarr's event loop, OpenMP, OpenCV pools) that a fork
  would copy in an unknown state;
* **one core each**: a worker runs OpenCV, zarr's codec pool and torch (when loaded) on one thread, so
  ``--workers N`` means N cores rather than N workers each starting a thread per core;
* **gone with their parent**: a watchdog thread ends the worker when the process that started it has died
  (``kill -9``, the OOM killer, a scheduler's hard kill), so no orphan keeps converting or writing after the run
  it belonged to. Normal ends, Ctrl-C and worker crashes are ``ProcessPoolExecutor``'s business;
* **flat over a cohort**: one malloc arena per worker (glibc), so freed case buffers are reused rather than
  left as holes in per-thread arenas and a worker's memory does not creep up over thousands of cases.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import multiprocessing
import os
import sys
import threading
import time
from concurrent.futures import ProcessPoolExecutor
from functools import lru_cache
from typing import Any

WATCHDOG_INTERVAL_S = 0.5


def die_with_parent(parent_pid: int, interval_s: float = WATCHDOG_INTERVAL_S) -> None:
    """End this process (exit status 1) as soon as ``parent_pid`` is no longer its parent; checks twice a second."""

    def watch() -> None:
        while os.getppid() == parent_pid:
            time.sleep(interval_s)
        os._exit(1)

    threading.Thread(target=watch, name="dlseg-parent-watchdog", daemon=True).start()


def before_fork() -> None:
    """Stop OpenCV's thread pool in this process before loaders fork workers: the pool is not fork-safe, and a
    forked child that touches it (``one_core``'s ``cv2.setNumThreads``) waits forever on the pool's copied lock."""
    import cv2

    cv2.setNumThreads(1)


def one_core(_worker_id: int | None = None) -> None:
    """Limit the libraries' thread pools in this process to one thread (also a DataLoader ``worker_init_fn``)."""
    import cv2
    import zarr

    cv2.setNumThreads(1)
    zarr.config.set({"threading.max_workers": 1})
    if "torch" in sys.modules:
        sys.modules["torch"].set_num_threads(1)


@lru_cache(maxsize=1)
def _glibc() -> Any:
    """The C library when it is glibc (which has ``mallopt`` and ``malloc_info``), else None."""
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name) if name else None
    except OSError:
        return None
    return libc if libc is not None and hasattr(libc, "mallopt") and hasattr(libc, "malloc_info") else None


M_ARENA_MAX = -8   # glibc mallopt parameter


def one_malloc_arena() -> bool:
    """glibc: every thread of this process allocates from one arena (``mallopt(M_ARENA_MAX, 1)``); False elsewhere.

    A worker's threads (its own, zarr's event loop and codec thread) otherwise get an arena each, and case buffers
    freed across them are kept as holes, so a long-running worker's peak memory creeps up case after case.
    Must run before the threads start allocating, i.e. first thing in a worker.
    """
    libc = _glibc()
    return bool(libc is not None and libc.mallopt(M_ARENA_MAX, 1) == 1)


def init_worker(parent_pid: int) -> None:
    """Pool initializer: one malloc arena, watch the parent, one core."""
    one_malloc_arena()
    die_with_parent(parent_pid)
    one_core()


def spawn_pool(workers: int) -> ProcessPoolExecutor:
    """A pool of ``workers`` spawned processes set up by :func:`init_worker`."""
    return ProcessPoolExecutor(max_workers=workers, mp_context=multiprocessing.get_context("spawn"),
                               initializer=init_worker, initargs=(os.getpid(),))

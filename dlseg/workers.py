"""Process pools for per-case work (preprocessing, evaluation): spawned, one core each, gone with their parent.

* **spawned**, never forked: the parent may hold threads (zarr's event loop, OpenMP, OpenCV pools) that a fork
  would copy in an unknown state;
* **one core each**: a worker runs OpenCV, zarr's codec pool and torch (when loaded) on one thread, so
  ``--workers N`` means N cores rather than N workers each starting a thread per core;
* **gone with their parent**: a watchdog thread ends the worker when the process that started it has died
  (``kill -9``, the OOM killer, a scheduler's hard kill), so no orphan keeps converting or writing after the run
  it belonged to. Normal ends, Ctrl-C and worker crashes are ``ProcessPoolExecutor``'s business;
* **flat over a cohort**: :func:`trimmed` runs each job and then hands the heap's free pages back to the OS
  (glibc), so a worker's resident memory does not creep up over thousands of cases.
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
from typing import Any, Callable, TypeVar

T = TypeVar("T")

WATCHDOG_INTERVAL_S = 0.5


def die_with_parent(parent_pid: int, interval_s: float = WATCHDOG_INTERVAL_S) -> None:
    """End this process (exit status 1) as soon as ``parent_pid`` is no longer its parent; checks twice a second."""

    def watch() -> None:
        while os.getppid() == parent_pid:
            time.sleep(interval_s)
        os._exit(1)

    threading.Thread(target=watch, name="dlseg-parent-watchdog", daemon=True).start()


def one_core() -> None:
    """Limit the libraries' thread pools in this process to one thread."""
    import cv2
    import zarr

    cv2.setNumThreads(1)
    zarr.config.set({"threading.max_workers": 1})
    if "torch" in sys.modules:
        sys.modules["torch"].set_num_threads(1)


def init_worker(parent_pid: int) -> None:
    """Pool initializer: watch the parent, then one core."""
    die_with_parent(parent_pid)
    one_core()


def spawn_pool(workers: int) -> ProcessPoolExecutor:
    """A pool of ``workers`` spawned processes set up by :func:`init_worker`."""
    return ProcessPoolExecutor(max_workers=workers, mp_context=multiprocessing.get_context("spawn"),
                               initializer=init_worker, initargs=(os.getpid(),))


@lru_cache(maxsize=1)
def _glibc() -> Any:
    """The C library when it is glibc (which has ``malloc_trim``), else None."""
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name) if name else None
    except OSError:
        return None
    return libc if libc is not None and hasattr(libc, "malloc_trim") else None


def trim_heap() -> bool:
    """Return free heap memory to the OS (glibc ``malloc_trim``); False where there is no such call."""
    libc = _glibc()
    return bool(libc is not None and libc.malloc_trim(0) is not None)


def trimmed(fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """``fn(*args, **kwargs)``, then :func:`trim_heap` (run in a worker, once per case)."""
    try:
        return fn(*args, **kwargs)
    finally:
        trim_heap()

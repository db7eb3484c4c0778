"""Per-process cache of prepared cases: one zarr read per case, bounded LRU of training-size arrays."""

from __future__ import annotations

import os
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np

from dlseg.normalize import NormConfig, prepare_mask, prepare_volume
from dlseg.store import Store, StoreError

PREPARED_BYTES_PER_VOXEL = 4 + 1  # float32 image + uint8 mask


@dataclass
class PreparedCase:
    """One case at training size: normalized image (Z,S,S) float32 and label mask (Z,S,S) uint8."""

    image: np.ndarray
    mask: np.ndarray

    @property
    def nbytes(self) -> int:
        return int(self.image.nbytes + self.mask.nbytes)


class CaseCache:
    """Per-process LRU of prepared cases, bounded by ``budget_bytes`` (it always holds the case in use).

    The store is opened lazily in the process that reads (DataLoader workers re-open it after fork/spawn);
    pickling drops the store and the cached arrays. ``reads`` counts store reads (misses), ``hits`` the rest.
    """

    def __init__(self, store_path: str | os.PathLike, size: int, norm: NormConfig, budget_bytes: int,
                 opener: Callable[[str], Store] = Store):
        self.store_path = str(store_path)
        self.size = int(size)
        self.norm = norm
        self.budget_bytes = int(budget_bytes)
        self.opener = opener
        self._reset()

    def _reset(self) -> None:
        """Forget the store handle and all cached cases (new process)."""
        self._pid = os.getpid()
        self._store: Store | None = None
        self._entries: OrderedDict[str, PreparedCase] = OrderedDict()
        self.nbytes = 0
        self.reads = 0
        self.hits = 0

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state.update(_store=None, _entries=OrderedDict(), nbytes=0, reads=0, hits=0)
        return state

    def store(self) -> Store:
        """The store, opened once per process."""
        if self._pid != os.getpid():
            self._reset()
        if self._store is None:
            self._store = self.opener(self.store_path)
        return self._store

    def get(self, case_id: str) -> PreparedCase:
        """The prepared case, from memory when cached, else read (one zarr call per array) and prepared."""
        store = self.store()
        case = self._entries.get(case_id)
        if case is not None:
            self._entries.move_to_end(case_id)
            self.hits += 1
            return case
        info = store.info(case_id)
        z = int(info.shape[0])
        self._evict_for(z * self.size * self.size * PREPARED_BYTES_PER_VOXEL)
        case = self._prepare(store, case_id)
        self.reads += 1
        self._entries[case_id] = case
        self.nbytes += case.nbytes
        return case

    def _evict_for(self, incoming: int) -> None:
        """Drop least recently used cases until ``incoming`` more bytes fit the budget (or nothing is left)."""
        while self._entries and self.nbytes + incoming > self.budget_bytes:
            _, old = self._entries.popitem(last=False)
            self.nbytes -= old.nbytes

    def _prepare(self, store: Store, case_id: str) -> PreparedCase:
        """Read a whole case and bring it to training size through ``normalize``."""
        attrs = store.info(case_id).attrs
        try:
            image, mask = store.read_case(case_id)
        except Exception as exc:  # zarr/numcodecs raise many types for damaged chunks
            reason = (str(exc).splitlines() or [""])[0]
            raise StoreError(f"{store.path}: case {case_id!r} is unreadable ({type(exc).__name__}: {reason})") from None
        if mask is None:
            raise StoreError(f"{store.path}: case {case_id!r} has no mask (training needs labeled cases)")
        if "stats" not in attrs or "modality" not in attrs:
            raise StoreError(f"{store.path}: case {case_id!r} lacks 'stats'/'modality' attributes")
        volume, mapping = prepare_volume(image, attrs["stats"], attrs["modality"], self.size, self.norm)
        return PreparedCase(volume, prepare_mask(mask, mapping))

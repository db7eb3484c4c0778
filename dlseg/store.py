"""The dlseg Zarr store: the one module that writes and reads the on-disk format.

Layout (Zarr v3, a directory store)::

    STORE.zarr/
      zarr.json                 root attributes (see ``ROOT_KEYS``)
      <case_id>/                one group per case, visible only once complete
        zarr.json               case attributes (see ``CASE_KEYS``)
        image                   (Z, H, W) int16 or float32, scanner values (CT in HU), blocks of
                                whole slices (~4 MB) per chunk, 1 shard (file) per array
        mask                    (Z, H, W) uint8 (absent for unlabeled cases)
      .partial/                 cases being written; never read, cleaned by the next writer

A case is written under ``.partial/<case>-<token>`` and renamed to ``<case_id>`` only after every byte
and its ``complete`` attribute are on disk, so a run killed at any moment leaves nothing a reader takes
as a valid case. The root's ``cases`` table is rewritten (atomically, by zarr) by :meth:`StoreWriter.finalize`.

Reading: :meth:`Store.read_case` fetches a whole case with one zarr call per array (one shard file),
because a zarr call has a fixed cost whatever its size, and decodes blocks of slices rather than one chunk
per slice (zarr's per-chunk cost outweighs decoding a slice); per-slice reads belong in memory.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

import numpy as np
import zarr
from zarr.codecs import BloscCodec

from dlseg.errors import StoreError
from dlseg.fileio import hash_file, install_dir

FORMAT_NAME = "dlseg-store"
FORMAT_VERSION = 1
PARTIAL_DIR = ".partial"

# Root attributes
ROOT_KEYS = ("format", "format_version", "cases", "split", "label_map", "fingerprint")
# Per-case attributes (all JSON); ``stats`` and ``foreground`` feed training and normalization; ``nifti`` (cases
# from NIfTI only) is the source geometry that prediction writes back (``dlseg.sources.nifti_volume``).
CASE_KEYS = (
    "case_id", "patient", "modality", "sequence", "group", "spacing", "origin", "direction",
    "source_files", "mask_files", "order", "fingerprint", "stats", "foreground", "shape", "complete", "nifti",
)

_CASE_ID_RE = re.compile(r"[^A-Za-z0-9._-]+")


def sanitize_case_id(text: str) -> str:
    """Make a case id safe as a path component and a zarr node name."""
    s = _CASE_ID_RE.sub("_", str(text)).strip("._")
    if not s:
        raise ValueError(f"case id {text!r} has no usable characters")
    return s


def fingerprint_files(paths: Iterable[str | os.PathLike], names: Iterable[str] | None = None) -> str:
    """SHA-256 over the (relative) names and bytes of source files, in the given order."""
    h = hashlib.sha256()
    paths = list(paths)
    names = list(names) if names is not None else [Path(p).name for p in paths]
    for name, p in zip(names, paths):
        h.update(name.encode())
        h.update(b"\0")
        hash_file(h, p)
        h.update(b"\1")
    return h.hexdigest()


@dataclass
class CaseData:
    """Everything one case puts in the store."""

    case_id: str
    image: np.ndarray                      # (Z, H, W) int16 or float32, scanner values
    mask: np.ndarray | None                # (Z, H, W) uint8, or None when unlabeled
    attrs: dict[str, Any] = field(default_factory=dict)  # CASE_KEYS except shape/complete/foreground


def _compressor() -> BloscCodec:
    return BloscCodec(cname="zstd", clevel=3, shuffle="bitshuffle")


CHUNK_BYTES = 4 << 20   # target size of one compressed unit (a block of whole slices) before compression


def chunk_slices(shape: tuple[int, int, int], itemsize: int) -> int:
    """Slices per chunk: as many whole slices as fit ``CHUNK_BYTES`` (at least one, at most the case)."""
    z, h, w = shape
    return max(1, min(z, CHUNK_BYTES // max(1, h * w * itemsize)))


def _write_array(group: zarr.Group, name: str, data: np.ndarray) -> None:
    """One array of a case: blocks of whole slices (≈ ``CHUNK_BYTES``) in one shard, i.e. one file per array.

    Blocks rather than one chunk per slice: zarr's fixed cost per chunk, on top of decoding, would dominate reading
    a whole case (the loader's and the predictor's access).
    """
    z, h, w = data.shape
    k = chunk_slices(data.shape, data.dtype.itemsize)
    arr = group.create_array(
        name, shape=data.shape, dtype=data.dtype, chunks=(k, h, w), shards=(-(-max(z, 1) // k) * k, h, w),
        compressors=_compressor(), fill_value=0,
    )
    arr[...] = data


def _json_safe(value: Any) -> Any:
    """Round-trip through JSON so attributes hold plain types only (numpy scalars → Python)."""
    return json.loads(json.dumps(value, default=lambda o: o.item() if hasattr(o, "item") else list(o)))


class StoreWriter:
    """Adds cases to a store (creating it if needed). Used by ``python -m preprocess``."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.path.mkdir(parents=True, exist_ok=True)
        self.root = zarr.open_group(store=str(self.path), mode="a", zarr_format=3)
        attrs = dict(self.root.attrs)
        if attrs.get("format", FORMAT_NAME) != FORMAT_NAME:
            raise StoreError(f"{self.path}: not a dlseg store (format={attrs.get('format')!r})")
        if "format_version" not in attrs:
            self.root.update_attributes({"format": FORMAT_NAME, "format_version": FORMAT_VERSION, "cases": {}})

    def clean_partial(self) -> None:
        """Remove cases left half-written by a killed run (call once, before any worker writes)."""
        shutil.rmtree(self.path / PARTIAL_DIR, ignore_errors=True)

    def case_ids(self) -> list[str]:
        """Ids of the complete cases on disk (whatever the root table says)."""
        return sorted(cid for cid in self._complete_attrs())

    def _complete_attrs(self) -> dict[str, dict[str, Any]]:
        """Attributes of every complete case directory, by case id."""
        out: dict[str, dict[str, Any]] = {}
        for child in sorted(self.path.iterdir()):
            if child.name.startswith(".") or not child.is_dir():
                continue
            attrs = self.complete_attrs(child.name)
            if attrs is not None:
                out[child.name] = attrs
        return out

    def complete_attrs(self, case_id: str) -> dict[str, Any] | None:
        """Attributes of a complete case already in the store, else None."""
        try:
            attrs = json.loads((self.path / case_id / "zarr.json").read_text()).get("attributes", {})
        except (OSError, ValueError):
            return None
        return attrs if attrs.get("complete") is True else None

    def complete_fingerprint(self, case_id: str) -> str | None:
        """Source fingerprint of a complete case already in the store, else None."""
        attrs = self.complete_attrs(case_id)
        return None if attrs is None else attrs.get("fingerprint")

    def case_version(self, case_id: str) -> tuple[int, int] | None:
        """Which stored version of a case is in place (inode and mtime of its metadata), else None.

        Every :meth:`write_case` installs a new folder, so the value changes even when the content is the same.
        """
        try:
            st = (self.path / case_id / "zarr.json").stat()
        except OSError:
            return None
        return st.st_ino, st.st_mtime_ns

    def write_case(self, case: CaseData) -> None:
        """Write one case atomically: to ``.partial/`` first, then rename into place.

        Safe to call from several processes at once for different cases.
        """
        case_id = sanitize_case_id(case.case_id)
        image = np.ascontiguousarray(case.image)
        if image.ndim != 3:
            raise ValueError(f"{case_id}: image must be (Z,H,W), got {image.shape}")
        if image.dtype not in (np.int16, np.float32):
            raise ValueError(f"{case_id}: image dtype must be int16 or float32, got {image.dtype}")
        mask = None if case.mask is None else np.ascontiguousarray(case.mask, dtype=np.uint8)
        if mask is not None and mask.shape != image.shape:
            raise ValueError(f"{case_id}: mask {mask.shape} does not match image {image.shape}")

        partial = self.path / PARTIAL_DIR / f"{case_id}-{uuid.uuid4().hex[:12]}"
        # "w-", not "w": "w" empties the new folder by rmtree + mkdir without parents, which fails whenever
        # another process removes an empty .partial/ in between (the rare failed case of parallel preprocessing)
        group = zarr.open_group(store=str(partial), mode="w-", zarr_format=3)
        _write_array(group, "image", image)
        if mask is not None:
            _write_array(group, "mask", mask)
        attrs = dict(case.attrs)
        attrs["case_id"] = case_id
        attrs["shape"] = list(image.shape)
        attrs["foreground"] = (
            [bool(x) for x in mask.reshape(mask.shape[0], -1).any(axis=1)] if mask is not None else None
        )
        attrs["complete"] = True  # written last: zarr.json is rewritten with it after the arrays exist
        group.update_attributes(_json_safe(attrs))  # one write of zarr.json (attrs.update writes once per key)

        install_dir(partial, self.path / case_id, self.path / PARTIAL_DIR / f"{case_id}-old-{uuid.uuid4().hex[:12]}")

    def remove_case(self, case_id: str) -> None:
        """Drop a case (e.g. its sources vanished or now fail)."""
        final = self.path / case_id
        if final.exists():
            trash = self.path / PARTIAL_DIR / f"{case_id}-del-{uuid.uuid4().hex[:12]}"
            trash.parent.mkdir(parents=True, exist_ok=True)
            os.rename(final, trash)
            shutil.rmtree(trash, ignore_errors=True)

    def finalize(self, split: dict[str, Any], label_map: dict[str, str]) -> dict[str, Any]:
        """Rewrite the root table from the complete cases on disk; return the root attributes.

        ``split`` holds ``train``/``val``/``unlabeled`` case-id lists plus ``seed`` and ``method``.
        """
        cases: dict[str, Any] = {}
        for cid, attrs in self._complete_attrs().items():
            cases[cid] = {
                "slices": attrs["shape"][0], "shape": attrs["shape"], "patient": attrs.get("patient"),
                "modality": attrs.get("modality"), "sequence": attrs.get("sequence"),
                "labeled": attrs.get("foreground") is not None, "fingerprint": attrs.get("fingerprint"),
            }
        h = hashlib.sha256()
        for cid in sorted(cases):
            h.update(f"{cid}:{cases[cid]['fingerprint']}\n".encode())
        root = {
            "format": FORMAT_NAME, "format_version": FORMAT_VERSION, "cases": cases,
            "split": split, "label_map": {str(k): v for k, v in label_map.items()},
            "fingerprint": h.hexdigest(),
        }
        self.root.update_attributes(_json_safe(root))  # one write: readers never see a half-updated root
        return root

    def add_splits(self, splits: dict[str, list[str]]) -> None:
        """Record more named splits (e.g. cross-validation folds) beside the store's own; cases must exist."""
        attrs = dict(self.root.attrs)
        if "split" not in attrs:
            raise StoreError(f"{self.path}: store was never finalized (preprocessing did not finish)")
        unknown = sorted({c for ids in splits.values() for c in ids} - set(attrs.get("cases", {})))
        if unknown:
            raise StoreError(f"{self.path}: no case {unknown[0]!r}")
        self.root.update_attributes({"split": {**attrs["split"], **splits}})


@dataclass(frozen=True)
class CaseInfo:
    """Attributes of one case, as stored."""

    case_id: str
    attrs: dict[str, Any]

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(self.attrs["shape"])  # type: ignore[return-value]

    @property
    def labeled(self) -> bool:
        return self.attrs.get("foreground") is not None

    @property
    def spacing(self) -> tuple[float, float, float]:
        return tuple(self.attrs["spacing"])  # type: ignore[return-value]


class Store:
    """Read-only view of a dlseg store. Cheap to construct; safe to re-open in each DataLoader worker."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        if not (self.path / "zarr.json").is_file():
            raise StoreError(f"{self.path}: no Zarr store here (run `python -m preprocess SRC {self.path}` first)")
        try:
            self.root = zarr.open_group(store=str(self.path), mode="r", zarr_format=3)
            self.attrs = dict(self.root.attrs)
        except Exception as exc:  # zarr raises many types for damaged metadata
            raise StoreError(f"{self.path}: unreadable Zarr store ({exc})") from None
        if self.attrs.get("format") != FORMAT_NAME:
            raise StoreError(f"{self.path}: not a dlseg store")
        if self.attrs.get("format_version") != FORMAT_VERSION:
            raise StoreError(
                f"{self.path}: store format version {self.attrs.get('format_version')} "
                f"(this dlseg reads {FORMAT_VERSION}); re-run preprocessing"
            )
        if "split" not in self.attrs:
            raise StoreError(f"{self.path}: store was never finalized (preprocessing did not finish)")
        self._infos: dict[str, CaseInfo] = {}

    # ---- root ----
    @property
    def cases(self) -> list[str]:
        return sorted(self.attrs.get("cases", {}))

    @property
    def split(self) -> dict[str, Any]:
        return self.attrs["split"]

    @property
    def label_map(self) -> dict[str, str]:
        return self.attrs.get("label_map", {})

    @property
    def fingerprint(self) -> str:
        return self.attrs.get("fingerprint", "")

    def split_cases(self, name: str) -> list[str]:
        """Case ids of a split group (``train``, ``val``, ``unlabeled``) or ``all``."""
        if name == "all":
            return self.cases
        if name not in self.split or not isinstance(self.split[name], list):
            raise StoreError(f"{self.path}: no split named {name!r} (have: {', '.join(self._split_names())})")
        return list(self.split[name])

    def _split_names(self) -> list[str]:
        return [k for k, v in self.split.items() if isinstance(v, list)]

    # ---- cases ----
    def info(self, case_id: str) -> CaseInfo:
        if case_id not in self._infos:
            if case_id not in self.attrs.get("cases", {}):
                raise StoreError(f"{self.path}: no case {case_id!r}")
            try:
                attrs = dict(self.root[case_id].attrs)
            except KeyError:
                raise StoreError(f"{self.path}: case {case_id!r} is listed but missing on disk") from None
            if attrs.get("complete") is not True:
                raise StoreError(f"{self.path}: case {case_id!r} is incomplete")
            self._infos[case_id] = CaseInfo(case_id, attrs)
        return self._infos[case_id]

    def read_case(self, case_id: str, mask: bool = True) -> tuple[np.ndarray, np.ndarray | None]:
        """Whole case as numpy: image (Z,H,W) and mask (Z,H,W) uint8 or None. One zarr call per array."""
        info = self.info(case_id)
        group = self.root[case_id]
        image = group["image"][...]
        m = group["mask"][...] if (mask and info.labeled) else None
        return image, m

    def read_slices(self, case_id: str, start: int, stop: int) -> tuple[np.ndarray, np.ndarray | None]:
        """A contiguous slab of slices [start, stop); for callers that cannot hold a whole case.

        Decodes the ~4 MB blocks that hold those slices, not only them.
        """
        info = self.info(case_id)
        group = self.root[case_id]
        image = group["image"][start:stop]
        m = group["mask"][start:stop] if info.labeled else None
        return image, m

"""StoreWriter under concurrency: writers of different cases must never fail one another."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import numpy as np

from dlseg.store import CaseData, Store, StoreWriter

CASES = 300


def test_parallel_writers_of_different_cases_all_land(tmp_path):
    """Two writers at once, as two preprocessing workers: every case lands.

    The rare "1 case of 40 failed" of a 2-worker preprocessing run: zarr's mode "w" emptied each new case folder by
    rmtree + mkdir (no parents), and a worker that had just finished removed the then-empty ``.partial/`` between
    the two.
    """
    writer = StoreWriter(tmp_path / "s.zarr")
    image = np.zeros((1, 4, 4), np.int16)

    def write(k: int) -> None:
        writer.write_case(CaseData(f"case-{k}", image, None, {"patient": str(k)}))

    with ThreadPoolExecutor(max_workers=2) as pool:
        errors = [f.exception() for f in [pool.submit(write, k) for k in range(CASES)]]
    assert [e for e in errors if e is not None] == []
    writer.clean_partial()                     # as the pipeline does once its workers are done
    writer.finalize({"train": [], "val": [], "unlabeled": [f"case-{k}" for k in range(CASES)], "seed": 0,
                     "method": "fixed"}, {"0": "background"})
    assert len(Store(writer.path).cases) == CASES

"""Loader workers are forked: a parent that used OpenCV's thread pool must not leave them waiting forever."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

SCRIPT = textwrap.dedent("""
    import sys
    import cv2, numpy as np, torch
    from torch.utils.data import DataLoader, Dataset
    from dlseg.data import DataConfig, _loader_kwargs

    cv2.setNumThreads(2)            # the parent's pool is running, as after prediction or augmentation in-process
    for _ in range(10):
        cv2.resize(np.random.rand(1024, 1024).astype(np.float32), (512, 512), interpolation=cv2.INTER_AREA)

    class Tiny(Dataset):
        def __len__(self):
            return 4

        def __getitem__(self, i):
            return torch.zeros(1)

    print(sum(1 for _ in DataLoader(Tiny(), **_loader_kwargs(DataConfig(workers=2), 2, False))))
""")


def test_forked_loader_workers_start_after_the_parent_used_opencv_threads():
    """Without stopping OpenCV's pool first, each forked worker hung in ``cv2.setNumThreads`` (its worker_init_fn)."""
    r = subprocess.run([sys.executable, "-c", SCRIPT], cwd=REPO, capture_output=True, text=True, timeout=120,
                       env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"})
    assert (r.returncode, r.stdout.strip()) == (0, "4"), r.stderr[-2000:]

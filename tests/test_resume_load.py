"""Exact resume beside a CPU burner: 1 epoch + ``--resume auto`` to 2 equals 2 uninterrupted epochs, bit for bit.

Loader workers, CPU augmentation and the step schedule are on, so worker timing, prefetching and the epoch
sampler all run while another process competes for the cores.
"""

from __future__ import annotations

import subprocess
import sys

from dlseg import checkpoint as ckpt
from dlseg import trainer
from dlseg.train import parse
from helpers import TINY_RUN, assert_same_weights, read_weights

LOADED = [*TINY_RUN, "--loader.workers", "2", "--loader.prefetch_factor", "2", "--optim.name", "adam",
          "--optim.lr", "3e-3", "--sched.name", "step", "--sched.step_size", "1", "--sched.gamma", "0.5",
          "--sched.warmup_epochs", "1", "--loss.name", "focal", "--keep_last", "1"]


def test_resume_beside_a_cpu_burner_equals_uninterrupted(synthetic_store, tmp_path):
    ref, split = tmp_path / "ref", tmp_path / "split"
    args = ["--data", str(synthetic_store), *LOADED]
    burner = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        assert trainer.run(parse([*args, "--out", str(ref), "--epochs", "2"])) == 0
        assert trainer.run(parse([*args, "--out", str(split), "--epochs", "1"])) == 0
        assert trainer.run(parse([*args, "--out", str(split), "--epochs", "2", "--resume", "auto"])) == 0
    finally:
        burner.kill()
        burner.wait()
    assert "resumed from" in (split / "train.log").read_text()
    newest = [read_weights(ckpt.list_checkpoints(run)[-1] / "model.safetensors") for run in (ref, split)]
    assert_same_weights(*newest)

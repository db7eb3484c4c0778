"""Checkpoint faults, each injected: a second job in a run folder, a changed identity, a finished run, planted
pickles, damaged checkpoints, ``kill -9`` mid-save, and two ranks that must resume from one checkpoint."""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import random
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from dlseg import checkpoint as ckpt
from dlseg import curves, runstart
from dlseg.errors import UsageError
from dlseg.fileio import write_synced
from dlseg.statefile import read_state, write_state
from dlseg.train import main as train_main
from helpers import TINY_RUN, assert_same_weights, read_weights

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
TRAIN = str(REPO / "dlseg" / "train.py")
TINY = [*TINY_RUN, "--loader.workers", "0", "--optim.lr", "1e-3", "--sched.step_size", "1", "--sched.gamma", "0.5",
        "--keep_last", "3"]
# What Accelerate's save_state writes (all pickles), planted beside a checkpoint's own files.
ACCELERATE_NAMES = ["custom_checkpoint_0.pkl", "random_states_0.pkl", "optimizer.bin", "scheduler.bin", "scaler.pt",
                    "pytorch_model.bin"]


def tiny(store: Path, out: Path, *extra: str) -> list[str]:
    return ["--data", str(store), "--out", str(out), *TINY, *extra]


def final(run: Path):
    return read_weights(ckpt.list_checkpoints(run)[-1] / ckpt.MODEL)


def one_error_line(capsys) -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    return err.strip()


@pytest.fixture(scope="module")
def two_epochs(synthetic_store, tmp_path_factory) -> Path:
    """An uninterrupted 2-epoch run (a checkpoint after each epoch): the reference of the fault tests."""
    out = tmp_path_factory.mktemp("faults") / "ref"
    assert train_main(tiny(synthetic_store, out, "--epochs", "2")) == 0
    assert len(ckpt.list_checkpoints(out)) == 2 and not (out / ".lock").exists()
    return out


def copy_run(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def after_epoch_1(ref: Path, dst: Path) -> Path:
    """A copy of the reference run as it was after epoch 1 (its newest checkpoint removed)."""
    out = copy_run(ref, dst)
    shutil.rmtree(ckpt.list_checkpoints(out)[-1])
    return out


class _Payload:
    """Unpickling this creates ``marker`` (what a real attack would do instead: run any code)."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def plant(folder: Path, name: str, payload: bytes) -> None:
    """Put ``payload`` under ``name`` and make the manifest agree, as an attacker with write access could."""
    (folder / name).write_bytes(payload)
    if name != ckpt.MANIFEST:
        manifest = json.loads((folder / ckpt.MANIFEST).read_text())
        manifest["files"][name] = {"bytes": len(payload), "sha256": hashlib.sha256(payload).hexdigest()}
        (folder / ckpt.MANIFEST).write_text(json.dumps(manifest))


# ---------------------------------------------------------------------------------------------- one run, one folder


def test_a_second_job_into_a_held_run_folder_exits_2_naming_the_holder(synthetic_store, tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    try:
        (out / ".lock").write_text(json.dumps({"host": socket.gethostname(), "pid": holder.pid,
                                               "started": "2026-01-01T00:00:00+00:00", "command": "train.py --out"}))
        assert train_main(tiny(synthetic_store, out, "--epochs", "1", "--resume", "auto")) == 2
        err = one_error_line(capsys)
        assert f"{out}: in use by another writer (pid {holder.pid} on {socket.gethostname()}" in err
        assert sorted(p.name for p in out.iterdir()) == [".lock"]           # nothing written: no config, no log
    finally:
        holder.kill()
        holder.wait()


def test_resume_with_another_identity_is_refused_naming_the_fields(two_epochs, synthetic_store, tmp_path, capsys):
    out = copy_run(two_epochs, tmp_path / "run")
    config = (out / "config.yaml").read_bytes()
    argv = tiny(synthetic_store, out, "--epochs", "3", "--resume", "auto", "--optim.lr", "0.01")
    assert train_main([*argv, "--loader.batch_size", "8"]) == 2
    err = one_error_line(capsys)
    newest = ckpt.list_checkpoints(out)[-1]
    assert err.startswith(f"error: {newest}: this run differs from the one that wrote the checkpoint: ")
    assert "effective_batch 4 → 8, optimizer.lr 0.001 → 0.01;" in err
    assert "--allow_change effective_batch,optimizer" in err
    assert (out / "config.yaml").read_bytes() == config                         # not overwritten before the check
    assert len(curves.read_metrics(out)) == 2

    # The documented flag accepts the change, and the new learning rate takes effect on the resumed schedule.
    assert train_main([*argv, "--allow_change", "optimizer.lr"]) == 0
    rows = curves.read_metrics(out)
    assert [r["epoch"] for r in rows] == [0, 1, 2]
    assert rows[1]["lr"] == pytest.approx(1e-3 * 0.5) and rows[2]["lr"] == pytest.approx(0.01 * 0.5 ** 2)
    assert "resume: optimizer.lr changed 0.001 → 0.01 (--allow_change)" in (out / "train.log").read_text()
    assert "lr: 0.01" in (out / "config.yaml").read_text()


def test_a_finished_run_says_so_and_a_fresh_start_never_mixes_into_a_used_folder(two_epochs, synthetic_store,
                                                                                 tmp_path, capsys):
    out = copy_run(two_epochs, tmp_path / "run")
    names = [p.name for p in ckpt.list_checkpoints(out)]
    assert train_main(tiny(synthetic_store, out, "--epochs", "2", "--resume", "auto")) == 0
    assert ("nothing to train: this run has already trained 2 epoch(s) (--epochs 2)"
            in " ".join((out / "train.log").read_text().split()))
    assert [p.name for p in ckpt.list_checkpoints(out)] == names and len(curves.read_metrics(out)) == 2
    assert_same_weights(read_weights(out / "model" / "model.safetensors"),
                        read_weights(two_epochs / "model" / "model.safetensors"))
    capsys.readouterr()
    assert train_main(tiny(synthetic_store, out, "--epochs", "3")) == 2         # no --resume: a new run
    assert f"{out}: already holds the checkpoints of a run (newest {names[-1]})" in one_error_line(capsys)


# ---------------------------------------------------------------------------------------------- no pickle


def test_planted_pickles_are_never_loaded(two_epochs, synthetic_store, tmp_path):
    marker = tmp_path / "pwned"
    payload = pickle.dumps(_Payload(marker))
    pickle.loads(payload)
    assert marker.exists()                                  # the payload does run when something unpickles it
    marker.unlink()

    out = copy_run(two_epochs, tmp_path / "run")
    older, newest = ckpt.list_checkpoints(out)
    for folder in (older, newest):                          # Accelerate's file names beside ours: never opened
        for name in ACCELERATE_NAMES:
            (folder / name).write_bytes(payload)
    own = sorted(p.name for p in newest.iterdir() if p.name not in ACCELERATE_NAMES)
    assert len(own) == 10 and ckpt.MANIFEST in own
    for name in own:                                        # each of our files replaced, manifest made to agree
        keep = (newest / name).read_bytes(), (newest / ckpt.MANIFEST).read_bytes()
        plant(newest, name, payload)
        chosen, notes = runstart.pick_checkpoint(out, "auto")
        assert chosen == older and len(notes) == 1 and f"checkpoint {newest} not used: " in notes[0], name
        (newest / name).write_bytes(keep[0])
        (newest / ckpt.MANIFEST).write_bytes(keep[1])
    assert runstart.pick_checkpoint(out, "auto") == (newest, [])

    for name in [n for n in own if n != ckpt.MANIFEST]:    # end to end, all at once, the manifest agreeing
        plant(newest, name, payload)
    assert train_main(tiny(synthetic_store, out, "--epochs", "1", "--resume", "auto")) == 0   # loads, trains nothing
    log = (out / "train.log").read_text()
    assert f"checkpoint {newest} not used: " in log and f"resumed from {older} " in log
    assert "nothing to train: this run has already trained 1 epoch(s) (--epochs 1)" in log
    assert not marker.exists()


# ---------------------------------------------------------------------------------------------- durable, verified


def test_a_damaged_newest_checkpoint_is_skipped_and_the_run_ends_as_uninterrupted(two_epochs, synthetic_store,
                                                                                  tmp_path):
    out = copy_run(two_epochs, tmp_path / "run")
    older, newest = ckpt.list_checkpoints(out)
    f = newest / "optimizer.safetensors"                   # one flipped byte: same size, another hash
    data = f.read_bytes()
    f.write_bytes(data[:-3] + bytes([data[-3] ^ 0xFF]) + data[-2:])
    assert runstart.pick_checkpoint(out, "auto") == (older, [
        f"checkpoint {newest} not used: optimizer.safetensors: contents differ from the manifest's SHA-256 "
        f"(corrupted); resuming from {older.name} instead"])
    f.write_bytes(data)

    f = newest / ckpt.MODEL                                # truncated: resumed end to end from the one before
    f.write_bytes(data := f.read_bytes()[: f.stat().st_size // 2])
    assert train_main(tiny(synthetic_store, out, "--epochs", "2", "--resume", "auto")) == 0
    log = (out / "train.log").read_text()
    assert (f"checkpoint {newest} not used: {ckpt.MODEL}: {len(data)} bytes, the manifest says {2 * len(data)} "
            f"(truncated or rewritten); resuming from {older.name} instead") in log
    assert f"resumed from {older} " in log
    assert_same_weights(final(out), final(two_epochs))
    assert [r["epoch"] for r in curves.read_metrics(out)] == [0, 1]


def test_kill_9_during_a_save_then_a_rerun_resumes_cleanly(two_epochs, synthetic_store, tmp_path, capsys):
    out = after_epoch_1(two_epochs, tmp_path / "run")
    first, second = (p.name for p in ckpt.list_checkpoints(two_epochs))
    paused = tmp_path / "saving"
    env = {**os.environ, ckpt.PAUSE_ENV: f"{second}:{paused}"}   # the save of epoch 2 stops after its first file
    argv = tiny(synthetic_store, out, "--epochs", "2", "--resume", "auto")
    job = subprocess.Popen([sys.executable, TRAIN, *argv], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 300
    while not paused.exists():
        assert job.poll() is None, job.stderr.read().decode()[-2000:]
        assert time.monotonic() < deadline, "the save never reached the pause"
        time.sleep(0.2)
    os.kill(job.pid, signal.SIGKILL)
    job.wait()
    job.stderr.close()
    partial = out / ckpt.CHECKPOINTS / f"{ckpt.TMP_PREFIX}{second}"
    assert partial.is_dir() and not (partial / ckpt.MANIFEST).exists()
    assert [p.name for p in ckpt.list_checkpoints(out)] == [first] and (out / ".lock").exists()

    capsys.readouterr()
    assert train_main(argv) == 0                                       # the rerun: same command
    said = " ".join(capsys.readouterr().out.split())
    assert f"took over a stale lock (pid {job.pid} on {socket.gethostname()}" in said
    assert f"resumed from {out / ckpt.CHECKPOINTS / first} " in (out / "train.log").read_text()
    assert not partial.exists() and not (out / ".lock").exists()
    assert [p.name for p in ckpt.list_checkpoints(out)] == [first, second]
    assert_same_weights(final(out), final(two_epochs))


# ---------------------------------------------------------------------------------------------- ranks


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch_two(args: list[str], env: dict[str, str]) -> None:
    cmd = ["accelerate", "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
           "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(_free_port()), TRAIN,
           *args, "--dist_timeout_s", "120"]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]


def test_two_ranks_resume_from_one_checkpoint_and_write_each_file_once(two_epochs, synthetic_store, tmp_path,
                                                                       capsys):
    out, writes = after_epoch_1(two_epochs, tmp_path / "ddp"), tmp_path / "writes"
    first = ckpt.list_checkpoints(out)[0]
    writes.mkdir()
    env = {**os.environ, "ACCELERATE_USE_CPU": "true", "OMP_NUM_THREADS": "1", ckpt.WRITE_LOG_ENV: str(writes),
           ckpt.HIDE_ENV: "1"}   # rank 1 sees no checkpoint at all: it must still resume from the main process's
    _launch_two(tiny(synthetic_store, out, "--epochs", "2", "--resume", "auto", "--debug_shards", "true",
                     "--allow_change", "effective_batch"), env)
    log = (out / "train.log").read_text()
    assert f"resumed from {first} " in log and "resume: effective_batch changed 4 → 8 (--allow_change)" in log
    digests = [json.loads((out / "debug" / f"rank{r}.jsonl").read_text())["weights"] for r in (0, 1)]
    assert digests[0] == digests[1]                     # one start: the same weights after the resumed epoch

    second = ckpt.list_checkpoints(out)[-1]             # written by the two ranks
    lines = {r: (writes / f"rank{r}.txt").read_text().split() for r in (0, 1)}
    assert len(lines[0] + lines[1]) == len(set(lines[0] + lines[1]))     # no file written twice
    assert sorted(lines[1]) == [f"{second.name}/rng_1.json", f"{second.name}/rng_1.safetensors"]
    assert sorted(lines[0]) == sorted(f"{second.name}/{p.name}" for p in second.iterdir() if "rng_1" not in p.name)
    assert json.loads((second / ckpt.MANIFEST).read_text())["world_size"] == 2

    capsys.readouterr()                                 # back to one process: the effective batch differs again
    assert train_main(tiny(synthetic_store, out, "--epochs", "3", "--resume", "auto")) == 2
    assert "effective_batch 8 → 4" in one_error_line(capsys)


def test_a_requeued_slurm_job_takes_over_its_earlier_runs_lock_from_another_host(tmp_path, monkeypatch):
    def lock_of(job: str, restart: int) -> None:
        (tmp_path / ".lock").write_text(json.dumps({"host": "node-that-died", "pid": 4242, "started": "?",
                                                    "command": f"train.py [slurm job {job} restart {restart}] --out"}))

    monkeypatch.setenv("SLURM_JOB_ID", "77")
    monkeypatch.delenv("SLURM_ARRAY_JOB_ID", raising=False)
    notes: list[str] = []
    for job, restart, ours in (("77", 0, 0), ("78", 0, 1), ("77", 1, 1)):   # same incarnation, another job, …
        lock_of(job, restart)
        monkeypatch.setenv("SLURM_RESTART_COUNT", str(ours))
        with pytest.raises(UsageError, match="another host, so its lock is never taken over automatically"):
            runstart.RunLock(tmp_path).acquire()
    lock_of("77", 0)                                        # restart 0 of this job, on a host that is gone
    lock = runstart.RunLock(tmp_path)
    lock.notice = notes.append
    lock.acquire()
    assert notes == [f"{tmp_path}: took over a stale lock (left by restart 0 of this Slurm job 77 (pid 4242 on "
                     "node-that-died); this is restart 1)"]
    assert "[slurm job 77 restart 1]" in json.loads((tmp_path / ".lock").read_text())["command"]
    lock.release()
    assert not (tmp_path / ".lock").exists()


def test_state_files_round_trip_every_kind_of_state_exactly(tmp_path):
    model = torch.nn.Conv2d(2, 3, 3).to(memory_format=torch.channels_last)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.9, 0.99))
    model(torch.randn(1, 2, 5, 5)).sum().backward()
    opt.step()
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state(),
             "optimizer": opt.state_dict(), "scaler": scaler.state_dict(), "odd": {3: (1.5, float("inf")), "n": None}}
    write_state(tmp_path, "s", state, write_synced)
    back = read_state(tmp_path, "s")
    assert back["python"] == state["python"] and isinstance(back["python"][1], tuple)
    assert back["numpy"][0] == "MT19937" and np.array_equal(back["numpy"][1], state["numpy"][1])
    assert back["numpy"][1].dtype == state["numpy"][1].dtype and back["numpy"][2:] == state["numpy"][2:]
    assert torch.equal(back["torch"], state["torch"])
    assert back["scaler"] == state["scaler"] and back["odd"] == state["odd"]
    assert back["optimizer"]["param_groups"] == state["optimizer"]["param_groups"]
    for key, saved in state["optimizer"]["state"].items():           # integer keys, tensors (strided ones too)
        assert {k: v.tolist() for k, v in back["optimizer"]["state"][key].items()} == {
            k: v.tolist() for k, v in saved.items()}
    random.setstate(back["python"])
    np.random.set_state(back["numpy"])
    torch.set_rng_state(back["torch"])
    fresh = torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.9, 0.99))
    fresh.load_state_dict(back["optimizer"])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s.json", "s.safetensors"]
    with pytest.raises(TypeError, match="without pickle"):
        write_state(tmp_path, "t", {"f": object()}, write_synced)

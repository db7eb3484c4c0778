"""``dlseg.locks.FolderLock``: one writer per folder, released on every exit, stale locks taken over safely."""

from __future__ import annotations

import json
import multiprocessing
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from dlseg.errors import UsageError
from dlseg.locks import LOCK_NAME, FolderLock, short_command
from dlseg.store import Store, StoreWriter


def read_lock(folder: Path) -> dict | None:
    """The lock file's JSON, or None when the folder is not locked."""
    lock = folder / LOCK_NAME
    return json.loads(lock.read_text()) if lock.exists() else None


def dead_pid() -> int:
    """The pid of a process that has exited (and been reaped)."""
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def plant(folder: Path, **info) -> Path:
    lock = folder / LOCK_NAME
    lock.write_text(json.dumps({"host": socket.gethostname(), "pid": os.getpid(), "started": "2024-01-01T00:00:00",
                                "command": "x", **info}))
    return lock


def test_lock_holds_json_and_is_removed_on_every_exit(tmp_path, monkeypatch):
    monkeypatch.setattr(sys, "argv", ["/home/someone/preprocess", "/data/Patient Name/src", "--workers", "2",
                                      "--split-file=/data/split.json"])
    with FolderLock(tmp_path, "python -m preprocess"):
        info = json.loads((tmp_path / LOCK_NAME).read_text())
        assert set(info) == {"host", "pid", "started", "command"}
        assert info["host"] == socket.gethostname() and info["pid"] == os.getpid() and "T" in info["started"]
        assert info["command"] == "python -m preprocess --workers --split-file"   # no values, no paths
        assert read_lock(tmp_path) == info
    assert not (tmp_path / LOCK_NAME).exists() and read_lock(tmp_path) is None
    for exc in (ValueError("boom"), KeyboardInterrupt()):
        with pytest.raises(type(exc)):
            with FolderLock(tmp_path):
                raise exc
        assert list(tmp_path.iterdir()) == []
    assert short_command().startswith("preprocess --workers")


def test_second_writer_is_refused_naming_the_holder(tmp_path):
    with FolderLock(tmp_path, "first"):
        with pytest.raises(UsageError) as err:
            FolderLock(tmp_path).acquire()
        msg = str(err.value)
        assert "\n" not in msg and msg.startswith(f"{tmp_path}: in use by another writer")
        assert f"pid {os.getpid()} on {socket.gethostname()}, since " in msg and "`first" in msg   # + pytest's own option names
        assert f"remove {tmp_path / LOCK_NAME}" in msg
        assert (tmp_path / LOCK_NAME).exists()
    assert not (tmp_path / LOCK_NAME).exists()


def test_stale_lock_of_a_dead_process_is_taken_over(tmp_path):
    pid = dead_pid()
    plant(tmp_path, pid=pid)
    notes: list[str] = []
    with FolderLock(tmp_path, notice=notes.append):
        assert read_lock(tmp_path)["pid"] == os.getpid()
    assert len(notes) == 1 and f"pid {pid}" in notes[0] and "no longer running" in notes[0]
    assert list(tmp_path.iterdir()) == []    # nothing left aside


def test_lock_of_another_host_is_never_taken_over(tmp_path):
    plant(tmp_path, host="node-elsewhere", pid=dead_pid())
    with pytest.raises(UsageError, match="another host, so its lock is never taken over automatically"):
        FolderLock(tmp_path).acquire()
    assert read_lock(tmp_path)["host"] == "node-elsewhere"


def test_unreadable_lock_is_waited_for_then_taken_over(tmp_path):
    lock = tmp_path / LOCK_NAME
    lock.write_text('{"host": "')           # half-written: its writer may be between open and write
    with pytest.raises(UsageError, match="another writer is starting"):
        FolderLock(tmp_path).acquire()
    old = time.time() - 60
    os.utime(lock, (old, old))
    notes: list[str] = []
    with FolderLock(tmp_path, notice=notes.append):
        assert read_lock(tmp_path)["pid"] == os.getpid()
    assert "unreadable lock file" in notes[0] and list(tmp_path.iterdir()) == []


def test_take_over_never_removes_a_lock_it_did_not_judge_stale(tmp_path):
    """The race: we judged a stale lock, someone else took it over first and created a fresh one."""
    lock = plant(tmp_path, pid=dead_pid())
    st, raw = os.stat(lock), lock.read_bytes()
    lock.unlink()
    with FolderLock(tmp_path, "winner"):
        assert not FolderLock(tmp_path)._move_aside((st.st_dev, st.st_ino), raw)
        assert read_lock(tmp_path)["command"].split()[0] == "winner"    # put back
        assert [p.name for p in tmp_path.iterdir()] == [LOCK_NAME]


def contend(folder: str, start: float, results, done) -> None:
    time.sleep(max(0.0, start - time.time()))
    try:
        with FolderLock(folder, notice=lambda s: None):
            results.put("won")
            done.wait(60)          # held until every contender has answered
    except UsageError:
        results.put("refused")


def test_concurrent_take_overs_have_one_winner(tmp_path):
    plant(tmp_path, pid=dead_pid())
    ctx = multiprocessing.get_context("spawn")
    results, done = ctx.Queue(), ctx.Event()
    start = time.time() + 2.0     # all start together (after spawning) on the same stale lock
    procs = [ctx.Process(target=contend, args=(str(tmp_path), start, results, done)) for _ in range(4)]
    for p in procs:
        p.start()
    got = sorted(results.get(timeout=60) for _ in procs)
    done.set()
    for p in procs:
        p.join(timeout=30)
    assert got == ["refused"] * 3 + ["won"]
    assert list(tmp_path.iterdir()) == []


def test_store_ignores_lock_files(synthetic_store, tmp_path):
    out = tmp_path / "s.zarr"
    shutil.copytree(synthetic_store, out)
    cases = Store(out).cases
    plant(out)
    (out / f"{LOCK_NAME}.stale-0badc0de").write_text("{")
    store = Store(out)
    assert store.cases == cases and store.read_case(cases[0])[0].ndim == 3
    writer = StoreWriter(out)
    assert writer.case_ids() == cases
    writer.clean_partial()
    root = writer.finalize(store.split, store.label_map)
    assert sorted(root["cases"]) == cases and Store(out).fingerprint == store.fingerprint
    assert (out / LOCK_NAME).is_file()

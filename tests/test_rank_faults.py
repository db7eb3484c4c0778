"""A rank that dies or hangs mid-epoch: the survivor names it once, in time, and exits 1 (never 75)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest
import torch.distributed as dist

from dlseg.preemption import EXIT_PREEMPTED, PREEMPTED_MARKER
from dlseg.ranks import (
    EXIT_RANK_LOST, RankLostError, Watchdog, _key, is_collective_error, leave_reason, report, roll_call,
)
from helpers import TINY_RUN

REPO = Path(__file__).resolve().parents[1]
TRAIN = str(REPO / "dlseg" / "train.py")
LOST = "distributed: rank {} stopped answering"
SLACK_S = 25          # start of the survivor's next collective, the roll call, the launcher's tear-down


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_pid(launcher: int, rank: int) -> int | None:
    """PID of the trainer process with RANK=rank among the launcher's children (read from /proc)."""
    for task in Path(f"/proc/{launcher}/task").glob("*"):
        for pid in (task / "children").read_text().split():
            try:
                environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
            except OSError:
                continue
            if f"RANK={rank}".encode() in environ:
                return int(pid)
    return None


def _wait_for(path: Path, text: str, proc: subprocess.Popen, limit_s: float = 180) -> None:
    deadline = time.monotonic() + limit_s
    while time.monotonic() < deadline and proc.poll() is None:
        if path.exists() and text in path.read_text():
            return
        time.sleep(0.05)
    raise AssertionError(f"{text!r} never appeared in {path} (launcher exit {proc.poll()})")


# A hung rank (SIGSTOP) is found by the survivor's watchdog (no heartbeat for dist_timeout_s), wherever it waits;
# a hung rank 0 is reported by rank 1 (the rendezvous store lives in the launcher, not in rank 0).
@pytest.mark.parametrize("fault, timeout_s, victim", [("kill", 60, 1), ("hang", 20, 1), ("hang", 20, 0)])
def test_a_rank_lost_mid_epoch_stops_the_job_with_one_message(synthetic_store, tmp_path, fault, timeout_s, victim):
    lost = LOST.format(victim)
    out = tmp_path / "run"
    env = {**os.environ, "ACCELERATE_USE_CPU": "true", "OMP_NUM_THREADS": "1"}
    cmd = ["accelerate", "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
           "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(_free_port()),
           TRAIN, "--data", str(synthetic_store), "--out", str(out), *TINY_RUN, "--loader.workers", "0",
           "--epochs", "1000", "--checkpoint_every_steps", "2", "--dist_timeout_s", str(timeout_s)]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        _wait_for(out / "train.log", "(periodic)", proc)          # mid-epoch: after the first periodic checkpoint
        pid = _rank_pid(proc.pid, victim)
        assert pid is not None
        os.kill(pid, signal.SIGKILL if fault == "kill" else signal.SIGSTOP)
        faulted = time.monotonic()
        if fault == "hang":   # the survivor's watchdog names it after dist_timeout_s; then the stuck rank is ended
            _wait_for(out / "train.log", lost, proc, timeout_s + SLACK_S)
            os.kill(pid, signal.SIGKILL)
        _, err = proc.communicate(timeout=timeout_s + SLACK_S)
        elapsed = time.monotonic() - faulted
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode not in (0, EXIT_PREEMPTED)
    assert elapsed < timeout_s + SLACK_S
    assert err.count(lost) == 1 and "[rank0]: Traceback" not in err, err[-3000:]
    log = (out / "train.log").read_text()
    assert log.count(lost) == 1 and "--resume auto" in log
    if fault == "hang":   # found by the watchdog: gloo's own timeout does not bound every wait
        assert f"{lost} (no heartbeat for " in log
    assert not (out / PREEMPTED_MARKER).exists()


def test_roll_call_names_lost_and_failed_ranks():
    store = dist.HashStore()
    leave_reason(store, 2, "TrainingError: 20 non-finite losses in a row\n(epoch 3)")
    store.set("dlseg/0/alive/3", "1")
    call = roll_call(store, 0, 4, wait_s=0.2)
    assert call.alive == {0, 3} and call.failed == {2: "TrainingError: 20 non-finite losses in a row (epoch 3)"}
    assert call.lost == [1] and call.reporter == 0
    error = report(call, 3, None)
    assert isinstance(error, RankLostError) and error.exit_status == EXIT_RANK_LOST != EXIT_PREEMPTED
    assert str(error).startswith("distributed: rank 1 stopped answering (killed, out of memory, or its node failed")
    assert "; rank 2 failed: TrainingError: 20 non-finite losses in a row (epoch 3);" in str(error)
    assert "the other 2 rank(s) stop too" in str(error)


def test_collective_errors_are_told_from_other_errors():
    assert is_collective_error(RuntimeError("[../gloo/transport/tcp/pair.cc:553] Connection closed by peer"))
    assert is_collective_error(dist.DistBackendError("NCCL communicator was aborted"))
    assert not is_collective_error(ValueError("shapes do not match"))
    assert not is_collective_error(RuntimeError("mat1 and mat2 shapes cannot be multiplied"))
    assert not is_collective_error(RuntimeError("DataLoader timed out after 60 seconds"))


class _Hung:
    """on_hung callback: records what the watchdog reported."""

    def __init__(self):
        self.calls: list[tuple[list[int], float]] = []

    def __call__(self, ranks: list[int], silent_s: float) -> None:
        self.calls.append((ranks, silent_s))


def _watch(store, rank, world, timeout_s=0.6, every_s=0.05) -> tuple[Watchdog, _Hung]:
    hung = _Hung()
    dog = Watchdog(store, rank, world, timeout_s, hung, every_s)
    dog.start()
    return dog, hung


def test_watchdog_names_the_peer_whose_heartbeat_stopped():
    store = dist.HashStore()
    dogs = [_watch(store, r, 3) for r in range(3)]
    time.sleep(0.5)
    dogs[2][0].stop()                       # rank 2 freezes: its counter stops
    for dog, _ in dogs[:2]:
        dog.join(timeout=5)
    dogs[2][0].join()
    for dog, hung in dogs[:2]:
        assert not dog.is_alive()
        assert len(hung.calls) == 1 and hung.calls[0][0] == [2] and 0.6 <= hung.calls[0][1] < 5
    assert dogs[2][1].calls == []           # the frozen rank itself reported nothing
    assert int(store.get(_key("beat", 0))) >= 10


def test_watchdog_leaves_finished_and_failed_ranks_alone():
    store = dist.HashStore()
    store.set(_key("done", 1), "1")         # rank 1 finished on purpose; rank 2 left a reason: neither beats
    leave_reason(store, 2, "ConfigError: bad value")
    dog, hung = _watch(store, 0, 3, timeout_s=0.3)
    time.sleep(1.0)
    dog.stop()
    dog.join()
    assert hung.calls == []


def test_watchdog_that_was_stopped_itself_does_not_blame_its_peers(monkeypatch):
    """After ``scontrol suspend`` every clock jumps: the peers get a fresh timeout instead of being reported."""
    store = dist.HashStore()
    peer, _ = _watch(store, 1, 2, timeout_s=60)
    clock = [1000.0]
    monkeypatch.setattr(time, "monotonic", lambda: clock[0])
    dog, hung = _watch(store, 0, 2, timeout_s=0.5, every_s=0.05)
    peer.stop()
    peer.join()
    clock[0] += 3600.0                       # this process and its peer were both stopped for an hour
    _until(lambda: dog.since[1] == clock[0])
    assert hung.calls == [] and dog.is_alive()
    clock[0] += 1.0                          # then the peer really stays silent
    dog.join(timeout=10)
    assert hung.calls == [([1], 1.0)]


def _until(condition, limit_s: float = 10.0) -> None:
    deadline = time.perf_counter() + limit_s
    while not condition():
        assert time.perf_counter() < deadline, "condition not reached"
        time.sleep(0.01)

"""A rank that dies: the others find out which one, say so once, and exit 1 (never the preemption status 75).

When a rank is killed (``kill -9``, the OOM killer, a lost node), every other rank fails in its next collective:
gloo at once ("Connection closed by peer") or after the process group's timeout (``dist_timeout_s``); the
launcher's agent may also send the survivors SIGTERM, which must not turn into a "preempted, requeue me" exit.
:func:`watch_ranks` turns that failure into :class:`RankLostError` after a short roll call over the rendezvous
store (the key-value store every rank already talks to): each survivor checks in, a rank that failed on its own
leaves its reason, and the ranks that neither answer nor left a reason are the lost ones. The lowest surviving
rank reports, in one line on stderr and in ``train.log``.

A rank that hangs (stopped, deadlocked, its node frozen) breaks no connection, and a survivor may sit in a wait no
collective timeout bounds. So every rank also beats a counter in the store from a thread (:class:`Watchdog`);
when a peer's count stands still for ``dist_timeout_s``, the survivors report it the same way and exit at once,
from that thread, since their main thread may be blocked for good. A rank that finished or left a reason is not
watched; a watchdog that was itself stopped (``scontrol suspend``) restarts its clocks rather than blame its peers.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Callable, Iterator

import torch.distributed as dist

from dlseg.console import err_console
from dlseg.errors import UserError, one_line

EXIT_RANK_LOST = 1          # training failed; 75 (EXIT_PREEMPTED) would ask the launch scripts for a requeue
ROLL_CALL_S = 5.0           # how long survivors wait for each other's check-in after a broken collective
# gloo raises plain RuntimeErrors whose text names its sources ("gloo/transport/tcp/pair.cc: Connection closed
# by peer", "...: Timed out waiting 6000ms for recv"); NCCL and c10d raise DistError kinds.
COLLECTIVE_SIGNS = ("gloo", "nccl")


class RankLostError(UserError):
    """Another rank died or failed, so this one cannot go on; ``str()`` names the rank(s)."""

    exit_status = EXIT_RANK_LOST


@dataclass
class RollCall:
    """Who answered after a broken collective: alive ranks, ranks that failed with a reason, the rest lost."""

    world: int
    alive: set[int] = field(default_factory=set)
    failed: dict[int, str] = field(default_factory=dict)
    silent_s: float | None = None     # set when the lost ranks were found by the watchdog (no heartbeat this long)

    @property
    def lost(self) -> list[int]:
        return [r for r in range(self.world) if r not in self.alive and r not in self.failed]

    @property
    def reporter(self) -> int:
        """The rank that prints the message: the lowest one alive."""
        return min(self.alive) if self.alive else -1

    def message(self) -> str:
        """One line naming the lost and failed ranks and what to do."""
        parts = []
        if self.lost:
            ranks = ", ".join(str(r) for r in self.lost)
            why = ("killed, out of memory, or its node failed: see its log" if self.silent_s is None else
                   f"no heartbeat for {self.silent_s:.0f} s: hung, stopped, or its node froze; see its log")
            parts.append(f"rank {ranks} stopped answering ({why})")
        parts += [f"rank {r} failed: {reason}" for r, reason in sorted(self.failed.items())]
        return (f"distributed: {'; '.join(parts)}; the other {len(self.alive)} rank(s) stop too (exit "
                f"{EXIT_RANK_LOST}); fix the cause and rerun with --resume auto to continue from the last checkpoint")


def is_collective_error(exc: BaseException) -> bool:
    """An error raised by a collective whose peer is gone or that timed out (torch raises RuntimeError kinds)."""
    if isinstance(exc, dist.DistError):
        return True
    text = str(exc).lower()
    return isinstance(exc, RuntimeError) and any(sign in text for sign in COLLECTIVE_SIGNS)


def _store() -> dist.Store | None:
    """The rendezvous store of the default process group, with a short timeout; None when there is none."""
    try:
        store = dist.distributed_c10d._get_default_store()
        store.set_timeout(timedelta(seconds=ROLL_CALL_S))
        return store
    except Exception:  # no process group, or its store is gone with the node that hosted it
        return None


def _key(kind: str, rank: int) -> str:
    # a restart of the launcher's worker group uses the same store: keep its keys apart
    return f"dlseg/{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}/{kind}/{rank}"


def leave_reason(store: dist.Store | None, rank: int, reason: str) -> None:
    """Tell the other ranks why this one stops (best effort: the store may be gone)."""
    if store is None:
        return
    try:
        store.set(_key("failed", rank), one_line(reason))
    except Exception:
        pass


def roll_call(store: dist.Store | None, rank: int, world: int, wait_s: float = ROLL_CALL_S) -> RollCall:
    """Check in, then collect for ``wait_s`` seconds who else checked in and who left a failure reason."""
    call = RollCall(world, alive={rank})
    if store is None:
        return call
    try:
        store.set(_key("alive", rank), "1")
        deadline = time.monotonic() + wait_s
        while True:
            for r in range(world):
                if r not in call.alive and store.check([_key("alive", r)]):
                    call.alive.add(r)
                elif r not in call.alive and r not in call.failed and store.check([_key("failed", r)]):
                    call.failed[r] = store.get(_key("failed", r)).decode(errors="replace")
            if not call.lost or time.monotonic() > deadline:
                return call
            time.sleep(0.1)
    except Exception:  # the store went away mid-call (its host died): report what is known
        return call


def report(call: RollCall, rank: int, log_path: Path | None) -> RankLostError:
    """The error this rank exits with; the reporter also writes it to ``train.log`` and, when not rank 0, stderr."""
    error = RankLostError(call.message())
    if rank == call.reporter:
        if log_path is not None and log_path.parent.is_dir():
            with open(log_path, "a") as f:
                f.write(f"{time.strftime('%Y-%m-%d %H:%M:%S')} {error}\n")
        if rank != 0:  # rank 0 prints through the entry point (console.run_entry)
            err_console.print(f"[bold red]error:[/] {error}", highlight=False, soft_wrap=True)
    return error


class Watchdog(threading.Thread):
    """Beats this rank's counter in the store every ``every_s``; calls ``on_hung(ranks, silent_s)`` once when peers'
    counters stand still for ``timeout_s`` (ranks that finished or left a reason are not watched).

    It shares the process group's store client with the main thread: a TCPStore client serializes its operations.
    """

    def __init__(self, store: dist.Store, rank: int, world: int, timeout_s: float,
                 on_hung: Callable[[list[int], float], None], every_s: float | None = None):
        super().__init__(daemon=True, name="dlseg-rank-watchdog")
        self.store, self.rank, self.timeout_s, self.on_hung = store, rank, timeout_s, on_hung
        self.every_s = every_s if every_s is not None else min(5.0, timeout_s / 6)
        self.stopped = threading.Event()
        self.peers = [r for r in range(world) if r != rank]
        self.seen: dict[int, bytes | None] = {r: None for r in self.peers}
        self.since = dict.fromkeys(self.peers, time.monotonic())

    def run(self) -> None:
        count, last = 0, time.monotonic()
        try:
            while not self.stopped.wait(self.every_s):
                now = time.monotonic()
                if now - last > 2 * self.every_s + ROLL_CALL_S:  # this process was stopped: restart the clocks
                    self.since = dict.fromkeys(self.peers, now)
                last, count = now, count + 1
                self.store.set(_key("beat", self.rank), str(count))
                hung = self._hung(now)
                if hung and not self.stopped.is_set():
                    self.on_hung(hung, now - min(self.since[r] for r in hung))
                    return
        except Exception:  # the store is gone (its host died): the main thread's collectives report that
            return

    def _hung(self, now: float) -> list[int]:
        """Peers whose counter has not moved for ``timeout_s`` (finished or failed ones are dropped)."""
        for r in list(self.peers):
            beat = self.store.get(_key("beat", r)) if self.store.check([_key("beat", r)]) else None
            if beat != self.seen[r]:
                self.seen[r], self.since[r] = beat, now
            elif self.store.check([_key("done", r)]) or self.store.check([_key("failed", r)]):
                self.peers.remove(r)   # asked only of a silent peer: the store serves every rank's watchdog
        return [r for r in self.peers if now - self.since[r] > self.timeout_s]

    def stop(self) -> None:
        self.stopped.set()


@dataclass
class RankWatch:
    """What :func:`watch_ranks` hands its body: ``start`` the watchdog once the process group exists."""

    rank: int
    world: int
    log_path: Path | None
    watchdog: Watchdog | None = None
    exiting: threading.Lock = field(default_factory=threading.Lock)

    def start(self, timeout_s: float, every_s: float | None = None) -> None:
        """Begin beating and watching the peers (no-op for one process or without a process group)."""
        store = _store() if self.world > 1 and dist.is_initialized() else None
        if store is None or self.watchdog is not None:
            return
        self.watchdog = Watchdog(store, self.rank, self.world, timeout_s, self._hung, every_s)
        self.watchdog.start()

    def stop(self, finished: bool) -> None:
        """Stop watching; ``finished`` also tells the peers this rank ended on purpose (not to be waited for)."""
        if self.watchdog is None:
            return
        self.watchdog.stop()
        if finished:
            try:
                self.watchdog.store.set(_key("done", self.rank), "1")
            except Exception:
                pass

    def _hung(self, ranks: list[int], silent_s: float) -> None:
        """From the watchdog thread: report the hung peers and end this process (its main thread may never return)."""
        if not self.exiting.acquire(blocking=False):
            return
        dog = self.watchdog
        assert dog is not None   # only the watchdog calls this
        call = RollCall(self.world, alive=set(range(self.world)) - set(ranks), silent_s=silent_s)
        if self.rank != call.reporter:   # the reporter may not have noticed yet: say why this rank leaves, give it time
            leave_reason(dog.store, self.rank, f"gave up on rank {', '.join(map(str, ranks))} (no heartbeat)")
            time.sleep(2 * dog.every_s)
        error = report(call, self.rank, self.log_path)
        if self.rank == call.reporter == 0:
            err_console.print(f"[bold red]error:[/] {error}", highlight=False, soft_wrap=True)
        sys.stderr.flush()
        os._exit(EXIT_RANK_LOST)


@contextmanager
def watch_ranks(rank: int, world: int, log_path: Path | None = None,
                wait_s: float = ROLL_CALL_S) -> Iterator[RankWatch]:
    """Run the body; when a collective breaks because a rank died or failed, raise :class:`RankLostError`.

    The body calls ``watch.start(timeout_s)`` once the process group exists, to catch hung ranks too.
    """
    watch = RankWatch(rank, world, log_path)
    if world == 1:
        yield watch
        return
    try:
        yield watch
    except Exception as exc:
        watch.exiting.acquire()   # blocks for good only while the watchdog reports a hung rank and ends the process
        watch.stop(finished=False)
        store = _store()
        if not is_collective_error(exc):
            leave_reason(store, rank, str(exc) if isinstance(exc, UserError) else f"{type(exc).__name__}: {exc}")
            raise
        previous = signal.signal(signal.SIGTERM, signal.SIG_IGN)  # the launcher tears survivors down meanwhile
        try:
            call = roll_call(store, rank, world, wait_s)
        finally:
            signal.signal(signal.SIGTERM, previous)
        if not call.lost and not call.failed:
            raise
        raise report(call, rank, log_path) from None
    else:
        watch.stop(finished=True)

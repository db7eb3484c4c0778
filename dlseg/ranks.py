"""A rank that dies: the others find out which one, say so once, and exit 1 (never the preemption status 75).

When a rank is killed (``kill -9``, the OOM killer, a lost node), every other rank fails in its next collective:
gloo at once ("Connection closed by peer") or after the process group's timeout (``dist_timeout_s``); the
launcher's agent may also send the survivors SIGTERM, which must not turn into a "preempted, requeue me" exit.
:func:`watch_ranks` turns that failure into :class:`RankLostError` after a short roll call over the rendezvous
store (the key-value store every rank already talks to): each survivor checks in, a rank that failed on its own
leaves its reason, and the ranks that neither answer nor left a reason are the lost ones. The lowest surviving
rank reports, in one line on stderr and in ``train.log``.
"""

from __future__ import annotations

import os
import signal
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Iterator

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
            parts.append(f"rank {ranks} stopped answering (killed, out of memory, or its node failed: see its log)")
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


@contextmanager
def watch_ranks(rank: int, world: int, log_path: Path | None = None,
                wait_s: float = ROLL_CALL_S) -> Iterator[None]:
    """Run the body; when a collective breaks because a rank died or failed, raise :class:`RankLostError`."""
    if world == 1:
        yield
        return
    try:
        yield
    except Exception as exc:
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

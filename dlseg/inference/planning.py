"""How the ranks of one prediction launch share the plan and the results without waiting inside a collective.

The main process alone plans (for a DICOM tree that reads every file's header: minutes on a large cohort) while
the others would sit in a broadcast that times out. Instead, after one quick broadcast of a token, the main
process writes the plan to ``OUT/.exchange-<token>/plan.json`` (atomically) and the other ranks poll for it;
at the end each rank writes ``rank-<i>.json`` and the main process polls for them. A rank waits on another only
while that rank's heartbeat file (``beat-<i>.json``, rewritten every few seconds by a thread) keeps changing:
a rank that died is given up after ``timeout_s`` without a beat, however long the others' work takes.

Cases are divided by slices (greedy, longest first), not by count.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import threading
import time
import uuid
from pathlib import Path
from typing import Any, Callable

from accelerate import PartialState
from accelerate.utils import broadcast_object_list

from dlseg.errors import ConfigError
from dlseg.fileio import atomic_write
from dlseg.inference.inputs import CaseSpec

PLAN_DELAY_ENV = "DLSEG_TEST_PLAN_DELAY_S"   # test hook: the planner sleeps this many seconds first
EXCHANGE_PREFIX = ".exchange-"
POLL_S = 0.2


def balance(slices: list[int], ranks: int) -> list[list[int]]:
    """Indices of ``slices`` per rank: longest first, each to the rank with the fewest slices so far (ties: the
    lower rank); every rank's indices in their original order."""
    loads, parts = [0] * ranks, [[] for _ in range(ranks)]
    for i in sorted(range(len(slices)), key=lambda i: (-slices[i], i)):
        r = min(range(ranks), key=lambda r: (loads[r], r))
        parts[r].append(i)
        loads[r] += slices[i]
    return [sorted(p) for p in parts]


def my_cases(todo: list[CaseSpec], rank: int, ranks: int) -> list[CaseSpec]:
    """This rank's share of the cases to predict, balanced by slices."""
    return [todo[i] for i in balance([max(1, s.slices) for s in todo], ranks)[rank]]


def spec_to_json(spec: CaseSpec) -> dict[str, Any]:
    return dataclasses.asdict(spec)


def _tuples(value: Any) -> Any:
    return tuple(_tuples(v) for v in value) if isinstance(value, list) else value


def spec_from_json(doc: dict[str, Any]) -> CaseSpec:
    """A CaseSpec back from JSON (its tuple fields come back as tuples)."""
    fields = {f.name: f for f in dataclasses.fields(CaseSpec)}
    return CaseSpec(**{k: _tuples(v) if "tuple" in str(fields[k].type) else v for k, v in doc.items()})


def plan_to_json(plan: dict[str, Any]) -> dict[str, Any]:
    return {**plan, "todo": [spec_to_json(s) for s in plan["todo"]]} if "todo" in plan else plan


def plan_from_json(doc: dict[str, Any]) -> dict[str, Any]:
    return {**doc, "todo": [spec_from_json(s) for s in doc["todo"]]} if "todo" in doc else doc


class Heartbeat(threading.Thread):
    """Rewrites ``beat-<rank>.json`` with a growing count every ``every_s`` seconds until stopped."""

    def __init__(self, path: Path, every_s: float):
        super().__init__(daemon=True, name="dlseg-heartbeat")
        self.path, self.every_s, self.count = path, every_s, 0
        self.stopped = threading.Event()

    def run(self) -> None:
        while not self.stopped.is_set():
            self.count += 1
            try:
                atomic_write(self.path, json.dumps({"count": self.count, "pid": os.getpid()}))
            except OSError:
                pass                      # the folder is being removed at the end of the run
            self.stopped.wait(self.every_s)


class Exchange:
    """The files through which the ranks of one launch share the plan and their results."""

    def __init__(self, out: Path, token: str, rank: int, world: int, timeout_s: float):
        self.dir = out / f"{EXCHANGE_PREFIX}{token}"
        self.rank, self.world, self.timeout_s = rank, world, timeout_s
        self.heartbeat: Heartbeat | None = None

    @classmethod
    def open(cls, out: Path, state: PartialState, timeout_s: float) -> Exchange:
        """One short broadcast of a fresh token (before any long work), then this rank's heartbeat."""
        token = [uuid.uuid4().hex[:12] if state.is_main_process else None]
        if state.num_processes > 1:
            broadcast_object_list(token, from_process=0)
        ex = cls(out, str(token[0]), state.process_index, state.num_processes, timeout_s)
        if ex.world > 1:
            ex.dir.mkdir(parents=True, exist_ok=True)
            ex.heartbeat = Heartbeat(ex.dir / f"beat-{ex.rank}.json", min(5.0, timeout_s / 4))
            ex.heartbeat.start()
        return ex

    def publish(self, name: str, doc: dict[str, Any]) -> None:
        atomic_write(self.dir / f"{name}.json", json.dumps(doc))

    def _beat(self, rank: int) -> int | None:
        try:
            return json.loads((self.dir / f"beat-{rank}.json").read_text())["count"]
        except (OSError, ValueError, KeyError, TypeError):
            return None

    def wait_for(self, name: str, rank: int) -> dict[str, Any] | None:
        """``name``.json once written; None when ``rank`` (its writer) shows no heartbeat for ``timeout_s``."""
        path, last, since = self.dir / f"{name}.json", None, time.monotonic()
        while True:
            if path.is_file():
                try:
                    return json.loads(path.read_text())
                except ValueError:
                    pass
            beat = self._beat(rank)
            if beat != last:
                last, since = beat, time.monotonic()
            elif time.monotonic() - since > self.timeout_s:
                return None
            time.sleep(POLL_S)

    def plan(self, make: Callable[[], dict[str, Any]]) -> dict[str, Any]:
        """The main process's plan on every rank; every rank stops with the main process's one-line reason."""
        if self.rank == 0:
            time.sleep(float(os.environ.get(PLAN_DELAY_ENV, "0") or 0))
            plan = make()
            if self.world > 1:
                self.publish("plan", plan_to_json(plan))
        else:
            doc = self.wait_for("plan", 0)
            if doc is None:
                self.results({"error": "no plan"})
                raise ConfigError(f"rank {self.rank}: the main process wrote no plan to {self.dir} and stopped "
                                  f"beating for {self.timeout_s:.0f} s (--dist-timeout-s); see its output")
            plan = plan_from_json(doc)
        if "error" in plan:
            self.results({"error": plan["error"]})
            raise ConfigError(plan["error"])
        return plan

    def results(self, mine: dict[str, Any]) -> list[dict[str, Any]] | None:
        """Main process: every rank's ``mine`` (a rank that died is left out); other ranks: publish, None."""
        if self.world == 1:
            return [mine]
        if self.rank != 0:
            self.publish(f"rank-{self.rank}", mine)
            self.close()
            return None
        got = [mine] + [self.wait_for(f"rank-{r}", r) for r in range(1, self.world)]
        self.close()
        shutil.rmtree(self.dir, ignore_errors=True)
        return [g for g in got if g is not None]

    def close(self) -> None:
        if self.heartbeat is not None:
            self.heartbeat.stopped.set()
            self.heartbeat.join()

"""The SLURM scripts under a real (local, two-node) Slurm: single node, two nodes, preemption + requeue, prediction.

Brings the cluster up with ``tests/slurm_cluster.sh`` (root only; skips with the reason otherwise). Jobs run the
tiny CPU configuration with ``ACCELERATE_USE_CPU=true``; the nodes offer fake GPUs so the scripts' GPU path
(``--gpus-per-node``, ``SLURM_GPUS_ON_NODE``) is the one exercised.
"""

from __future__ import annotations

import fcntl
import json
import os
import re
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from helpers import TINY_RUN, assert_same_weights, read_weights

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
HARNESS = REPO / "tests" / "slurm_cluster.sh"
LOCK = Path("/tmp/dlseg-slurm-cluster.lock")
LOCK_WAIT_S = 300
JOB_LIMIT_S = 300
# Trainer arguments shared by every training job (the preemption test compares weights with the single-node run).
TINY = [*TINY_RUN, "--epochs", "2", "--checkpoint_every_steps", "2", "--keep_last", "1"]
# Per job: one fake GPU and one CPU per node (workers = CPUs - 1 = 0), a short time limit.
RESOURCES = ["--gpus-per-node=1", "--cpus-per-task=1", "--time=10"]
TERMINAL = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE",
            "PREEMPTED"}


@dataclass
class Cluster:
    """The local cluster and the environment jobs are submitted with."""

    state: Path
    env: dict[str, str]
    logs: Path

    def submit(self, script: str, *args: str, sbatch: tuple[str, ...] = (), env: dict[str, str] | None = None) -> str:
        """``sbatch --parsable`` from the repository root; returns the job id."""
        cmd = ["sbatch", "--parsable", f"--output={self.logs}/slurm-%j.out", *RESOURCES, *sbatch, script, *args]
        r = subprocess.run(cmd, cwd=REPO, env={**self.env, **(env or {})}, capture_output=True, text=True,
                           timeout=60)
        assert r.returncode == 0, r.stderr
        return r.stdout.strip().split(";")[0]

    def states(self, job: str) -> list[str]:
        """JobState of the job (of every task, for an array)."""
        r = subprocess.run(["scontrol", "-o", "show", "job", job], capture_output=True, text=True, timeout=30)
        return re.findall(r"JobState=(\S+)", r.stdout)

    def field(self, job: str, name: str) -> str:
        """One field of ``scontrol show job`` (first task)."""
        r = subprocess.run(["scontrol", "-o", "show", "job", job], capture_output=True, text=True, timeout=30)
        m = re.search(rf"\b{name}=(\S+)", r.stdout)
        return m.group(1) if m else ""

    def wait(self, job: str, limit: float = JOB_LIMIT_S) -> list[str]:
        """Poll until the job (every array task) has ended; cancel it and fail after ``limit`` seconds."""
        deadline = time.monotonic() + limit
        while time.monotonic() < deadline:
            states = self.states(job)
            if states and all(s in TERMINAL for s in states):
                return states
            time.sleep(0.5)
        subprocess.run(["scancel", job], timeout=30)
        pytest.fail(f"job {job} did not end within {limit}s: {self.states(job)}\n{self.job_output(job)}")

    def job_output(self, job: str) -> str:
        """The Slurm output files of a job (for failure messages)."""
        return "\n".join(p.read_text(errors="replace")[-3000:] for p in sorted(self.logs.glob(f"slurm-{job}*.out")))


def run_logs(run: Path) -> str:
    """All per-job-and-restart logs of a run folder, concatenated (for asserts and failure messages)."""
    return "\n".join(p.read_text(errors="replace") for p in sorted(run.glob("slurm-*-restart*.log")))


def newest_checkpoint(run: Path) -> Path:
    """The newest complete checkpoint folder of a run."""
    found = sorted((p for p in (run / "checkpoints").glob("step_*") if p.is_dir()), key=lambda p: p.name)
    assert found, f"no checkpoint in {run}"
    return found[-1]


@pytest.fixture(scope="module")
def slurm(tmp_path_factory) -> Cluster:
    """A running two-node cluster owned by this test session (exclusive across sessions on this machine)."""
    if os.geteuid() != 0:
        pytest.skip("Slurm tests need root (they run slurmctld/slurmd and write /etc/slurm)")
    if shutil.which("apt-get") is None and shutil.which("slurmctld") is None:
        pytest.skip("Slurm is not installed and apt-get is not available")
    lock = open(LOCK, "w")
    deadline = time.monotonic() + LOCK_WAIT_S
    while True:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            break
        except BlockingIOError:
            if time.monotonic() > deadline:
                lock.close()
                pytest.skip(f"another test session has held the local Slurm cluster ({LOCK}) for {LOCK_WAIT_S}s")
            time.sleep(1)
    state = tmp_path_factory.mktemp("slurm")
    try:
        r = subprocess.run(["bash", str(HARNESS), "up", str(state)], capture_output=True, text=True, timeout=600)
        if r.returncode == 3:
            pytest.skip(r.stderr.strip().splitlines()[-1])
        assert r.returncode == 0, f"slurm_cluster.sh up failed:\n{r.stderr}"
        logs = tmp_path_factory.mktemp("slurm_jobs")
        env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
        env.update(PATH=f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}", DLSEG_ROOT=str(REPO),
                   ACCELERATE_USE_CPU="true", MIXED_PRECISION="no", PYTHONPATH=str(REPO))
        yield Cluster(state, env, logs)
    finally:
        subprocess.run(["bash", str(HARNESS), "down", str(state)], capture_output=True, timeout=120)
        fcntl.flock(lock, fcntl.LOCK_UN)
        lock.close()


@pytest.fixture(scope="module")
def single_run(slurm, synthetic_store, tmp_path_factory) -> Path:
    """``sbatch --wait launch/train.sbatch`` on the synthetic store; the uninterrupted reference run."""
    run = tmp_path_factory.mktemp("launch") / "single"
    cmd = ["timeout", str(JOB_LIMIT_S), "sbatch", "--wait", f"--output={slurm.logs}/slurm-%j.out", *RESOURCES,
           "launch/train.sbatch", *TINY]
    r = subprocess.run(cmd, cwd=REPO, env={**slurm.env, "RUN": str(run), "DATA": str(synthetic_store)},
                       capture_output=True, text=True, timeout=JOB_LIMIT_S + 30)
    assert r.returncode == 0, f"sbatch --wait: exit {r.returncode}\n{r.stdout}{r.stderr}\n{run_logs(run)}"
    return run


def test_cluster_up_is_idempotent(slurm):
    r = subprocess.run(["bash", str(HARNESS), "up", str(slurm.state)], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and "already up" in r.stderr, r.stderr
    nodes = subprocess.run(["sinfo", "-h", "-N", "-o", "%N %t %G"], capture_output=True, text=True, timeout=30)
    assert sorted(line.split()[0] for line in nodes.stdout.splitlines()) == ["node1", "node2"]
    assert "gpu:2" in nodes.stdout


def test_train_single_node(single_run):
    logs = run_logs(single_run)
    assert re.search(r"slurm-\d+-restart0\.log", " ".join(p.name for p in single_run.iterdir()))
    assert "training finished" in logs, logs
    assert "--num_processes 1" in logs and "--loader.workers 0" in logs  # 1 fake GPU, 1 CPU per task
    ckpt = newest_checkpoint(single_run)
    records = [json.loads(line) for line in (single_run / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records] == [0, 1]
    assert ckpt.name == f"step_{records[-1]['global_step']:07d}"   # the state at the end of training
    assert (ckpt / "model.safetensors").is_file()
    model = json.loads((single_run / "model" / "model.json").read_text())
    assert model["format"] == "dlseg-model" and model["arch"]["base_width"] == 4
    assert read_weights(single_run / "model" / "model.safetensors")
    assert "world size 1 " in (single_run / "train.log").read_text()


def wait_for_training(slurm: Cluster, job: str, run: Path) -> None:
    """Return once the run's first periodic checkpoint exists: training is under way."""
    deadline = time.monotonic() + JOB_LIMIT_S
    while not list((run / "checkpoints").glob("step_*")):
        assert time.monotonic() < deadline, f"no checkpoint within {JOB_LIMIT_S}s\n{run_logs(run)}"
        assert not set(slurm.states(job)) & TERMINAL, slurm.job_output(job) + run_logs(run)
        time.sleep(0.1)


def test_train_multinode_two_ranks_agree_and_survive_early_preemption(slurm, synthetic_store, tmp_path):
    run = tmp_path / "multinode"
    job = slurm.submit("launch/train_multinode.sbatch", *TINY, "--debug_shards", "true", sbatch=("--nodes=2",),
                       env={"RUN": str(run), "DATA": str(synthetic_store), "DLSEG_RESEND_S": "1"})
    # Signal as soon as both nodes run their launcher, while the trainer is still starting (not listening yet):
    # the scripts repeat the signal until the trainer acts on it.
    deadline = time.monotonic() + JOB_LIMIT_S
    while "node 1 of 2 on node2" not in run_logs(run):
        assert time.monotonic() < deadline and not set(slurm.states(job)) & TERMINAL, slurm.job_output(job)
        time.sleep(0.1)
    assert not list((run / "checkpoints").glob("step_*"))
    subprocess.run(["scancel", "--signal=USR1", "--batch", job], check=True, timeout=30)
    assert slurm.wait(job) == ["COMPLETED"], slurm.job_output(job) + run_logs(run)
    assert slurm.field(job, "Restarts") == "1"
    logs = run_logs(run)
    # srun passed the batch shell's USR1 on to both nodes; the trainer saved once; the job was requeued
    assert re.search(r"^0: .*node 0: trainer stopped after SIGUSR1", logs, re.M), logs
    assert re.search(r"^1: .*node 1: trainer stopped after SIGUSR1", logs, re.M), logs
    assert f"requeueing job {job} (restart 1)" in logs and "training finished" in logs
    assert "resumed from" in (run / "train.log").read_text()
    # one srun task per node (srun --label prefixes the task number), each with its machine rank
    assert re.search(r"^0: .*node 0 of 2 on node1: accelerate launch --machine_rank 0", logs, re.M), logs
    assert re.search(r"^1: .*node 1 of 2 on node2: accelerate launch --machine_rank 1", logs, re.M), logs
    assert "--num_machines 2 --num_processes 2 --main_process_ip node1" in logs
    assert "world size 2 (MULTI_CPU" in (run / "train.log").read_text()
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
    assert [r["epoch"] for r in records] == [0, 1] and {r["world_size"] for r in records} == {2}
    ranks = {}
    for rank in (0, 1):
        ranks[rank] = [json.loads(line) for line in (run / "debug" / f"rank{rank}.jsonl").read_text().splitlines()]
    assert len(ranks[0]) == len(ranks[1]) >= 2             # one record per epoch (+1 for an interrupted one)
    trained = 0
    for r0, r1 in zip(ranks[0], ranks[1]):
        assert r0["world_size"] == r1["world_size"] == 2
        assert r0["weights"] == r1["weights"]              # both ranks hold the same weights after every epoch
        seen0 = {s for batch in r0["batches"] for s in batch}
        seen1 = {s for batch in r1["batches"] for s in batch}
        # disjoint, equal shares of the epoch; empty for both when the signal landed after an epoch's last step
        # and the resumed run had only the epoch's end left to do
        assert not (seen0 & seen1) and len(r0["batches"]) == len(r1["batches"])
        trained += len(seen0) + len(seen1)
    assert trained > 0
    assert (run / "model" / "model.safetensors").is_file()


def test_preemption_requeues_and_resumes_exactly_but_cancel_does_not(slurm, single_run, synthetic_store, tmp_path):
    run, cancelled = tmp_path / "preempted", tmp_path / "cancelled"
    job = slurm.submit("launch/train.sbatch", *TINY, env={"RUN": str(run), "DATA": str(synthetic_store)})
    # alongside (each node has 2 slots): a job the user cancels, which must save but not come back
    other = slurm.submit("launch/train.sbatch", *TINY, env={"RUN": str(cancelled), "DATA": str(synthetic_store)})
    wait_for_training(slurm, job, run)
    subprocess.run(["scancel", "--signal=USR1", "--batch", job], check=True, timeout=30)
    wait_for_training(slurm, other, cancelled)
    subprocess.run(["scancel", other], check=True, timeout=30)
    assert slurm.wait(job) == ["COMPLETED"], slurm.job_output(job) + run_logs(run)
    assert slurm.field(job, "Restarts") == "1"

    assert slurm.wait(other) == ["CANCELLED"]
    time.sleep(1)                                            # let the batch shell finish its last line
    assert slurm.field(other, "Restarts") == "0"
    logs = run_logs(cancelled)
    assert "got SIGTERM" in logs and "requeueing job" not in logs, logs
    assert "stopped by SIGTERM (exit 1), state saved: not requeueing" in logs, logs
    assert "preempted (SIG" in (cancelled / "train.log").read_text()   # TERM from Slurm, USR1 from the script

    first = (run / f"slurm-{job}-restart0.log").read_text()
    second = (run / f"slurm-{job}-restart1.log").read_text()
    assert "got SIGUSR1" in first and f"requeueing job {job} (restart 1)" in first, first
    assert f"dlseg {job}/1] job {job} restart 1" in second and "training finished" in second, second
    train_log = (run / "train.log").read_text()
    assert "preempted (SIGUSR1): state saved" in train_log and "resumed from" in train_log, train_log
    assert not (run / "PREEMPTED").exists()
    # the interrupted-and-resumed run ends with exactly the weights of the uninterrupted one
    assert newest_checkpoint(run).name == newest_checkpoint(single_run).name
    assert_same_weights(read_weights(newest_checkpoint(run) / "model.safetensors"),
                        read_weights(newest_checkpoint(single_run) / "model.safetensors"))
    assert_same_weights(read_weights(run / "model" / "model.safetensors"),
                        read_weights(single_run / "model" / "model.safetensors"))


def test_predict_array_writes_every_case(slurm, single_run, synthetic_root, tmp_path):
    out = tmp_path / "pred"
    # indices 1 and 3: the script counts shards from the first index in steps of 2 (shards 0/2 and 1/2)
    job = slurm.submit("launch/predict.sbatch", sbatch=("--array=1-3:2",),
                       env={"MODEL": str(single_run), "INPUT": str(synthetic_root), "OUT": str(out),
                            "LOG_DIR": str(tmp_path / "logs")})
    assert slurm.wait(job) == ["COMPLETED", "COMPLETED"], slurm.job_output(job)
    logs = "\n".join(p.read_text(errors="replace") for p in sorted((tmp_path / "logs").glob("slurm-*.log")))
    assert "--shard 0/2" in logs and "--shard 1/2" in logs, logs
    expected = sorted(f"MR-{p.name}-T1in" for p in (synthetic_root / "Train_Sets" / "MR").iterdir())
    written: list[str] = []
    for index in (0, 1):
        summary = json.loads((out / f"summary-shard-{index}-of-2.json").read_text())
        assert summary["shard"] == {"index": index, "count": 2} and summary["cohort_cases"] == len(expected)
        assert summary["failed"] == 0 and summary["predicted"] == summary["cases_total"] >= 1
        for row in summary["cases"]:
            assert row["status"] == "predicted"
            case = out / row["case_id"]
            assert (case / "record.json").is_file() and len(list(case.glob("*.png"))) == row["slices"]
            written.append(row["case_id"])
    assert sorted(written) == expected                      # every case once, split across the two tasks
    folders = sorted(p.name for p in out.iterdir() if p.is_dir() and p.name != ".failed")
    assert folders == expected                              # one OUT, nothing temporary left, no .inputs tree
    assert not (out / "summary.csv").exists()


def test_scripts_parse_and_pass_shellcheck():
    scripts = [*sorted((REPO / "launch").glob("*.sbatch")), *sorted((REPO / "launch").glob("*.sh")), HARNESS]
    for script in scripts:
        r = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True, timeout=30)
        assert r.returncode == 0, f"{script}: {r.stderr}"
    if shutil.which("shellcheck") is None:
        pytest.skip("shellcheck not installed (apt-get install shellcheck); bash -n passed")
    r = subprocess.run(["shellcheck", "-x", "--severity=warning", *map(str, scripts)], cwd=REPO,
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stdout


def test_gpu_check_refuses_without_cuda_in_one_line(tmp_path):
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    script = str(REPO / "launch" / "gpu_check.sh")
    r = subprocess.run(["bash", script, str(tmp_path / "out")], env=env, capture_output=True, text=True, timeout=120)
    assert (r.returncode, r.stdout, r.stderr.splitlines()) == (
        2, "", ["gpu_check.sh: no CUDA device visible to torch; run it on a GPU machine"])
    assert not (tmp_path / "out").exists()
    for args in ([], [str(tmp_path / "a"), str(tmp_path / "b")]):
        r = subprocess.run(["bash", script, *args], env=env, capture_output=True, text=True, timeout=30)
        assert (r.returncode, r.stderr.strip()) == (2, "usage: launch/gpu_check.sh OUT_DIR")


@pytest.mark.parametrize("script", ["train.sbatch", "train_multinode.sbatch"])
def test_default_run_folder_is_one_per_job_and_stable_across_requeues(script, tmp_path):
    """Without RUN, two jobs of one name get two folders; a requeue (same job id) and an array task keep theirs."""
    root = tmp_path / "checkout"
    for sub in ("launch", "accelerate_configs"):
        shutil.copytree(REPO / sub, root / sub)
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    fake = bin_dir / ("accelerate" if script == "train.sbatch" else "srun")
    fake.write_text('#!/bin/sh\necho "$@" >> "$DLSEG_FAKE_ARGS"\n')
    fake.chmod(0o755)
    if script != "train.sbatch":
        for name, body in (("accelerate", "exit 0"), ("scontrol", "echo n1")):
            (bin_dir / name).write_text(f"#!/bin/sh\n{body}\n")
            (bin_dir / name).chmod(0o755)
    strip = ("SLURM_", "RUN")
    base = {k: v for k, v in os.environ.items() if not k.startswith(strip)}
    base.update(PATH=f"{bin_dir}:{os.environ['PATH']}", DLSEG_ROOT=str(root), SLURM_JOB_NAME="sweep",
                SLURM_NNODES="1", SLURM_JOB_NODELIST="n1")

    def out_folder(**slurm: str) -> str:
        args = tmp_path / "args.txt"
        args.unlink(missing_ok=True)
        env = {**base, **slurm, "DLSEG_FAKE_ARGS": str(args)}
        r = subprocess.run(["bash", str(root / "launch" / script)], env=env, capture_output=True, text=True,
                           timeout=60)
        assert r.returncode == 0, r.stdout + r.stderr
        words = args.read_text().split()
        return words[words.index("--out") + 1]

    assert out_folder(SLURM_JOB_ID="4242") == "runs/sweep-4242"
    assert out_folder(SLURM_JOB_ID="4242", SLURM_RESTART_COUNT="3") == "runs/sweep-4242"     # requeued: same
    assert out_folder(SLURM_JOB_ID="4243") == "runs/sweep-4243"                              # another job
    assert out_folder(SLURM_JOB_ID="503", SLURM_ARRAY_JOB_ID="500", SLURM_ARRAY_TASK_ID="3") == "runs/sweep-500_3"
    assert out_folder(SLURM_JOB_ID="4244", RUN="runs/mine") == "runs/mine"                   # RUN wins
    assert (root / "runs" / "sweep-4242").is_dir() and (root / "runs" / "sweep-500_3").is_dir()


@pytest.mark.parametrize("rc, restarts, last_line, status, requeued", [
    (1, "0", "2026-01-01 00:00:00 distributed: rank 1 stopped answering (killed ...)", 1, False),
    (75, "0", "2026-01-01 00:00:00 preempted (SIGUSR1): state saved", 0, True),
    (75, "3", "2026-01-01 00:00:00 preempted (SIGUSR1): state saved", 75, False),
])
def test_finish_training_requeues_only_a_preemption_and_names_a_lost_rank(tmp_path, rc, restarts, last_line,
                                                                          status, requeued):
    bin_dir, run = tmp_path / "bin", tmp_path / "run"
    bin_dir.mkdir()
    run.mkdir()
    (bin_dir / "scontrol").write_text(f"#!/bin/bash\necho \"$@\" >> {tmp_path}/scontrol.calls\n")
    (bin_dir / "scontrol").chmod(0o755)
    (run / "train.log").write_text(f"2026-01-01 00:00:00 world size 2\n{last_line}\n")
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}", "SLURM_JOB_ID": "42",
           "SLURM_RESTART_COUNT": restarts}
    r = subprocess.run(["bash", "-c", f"source launch/common.sh; dlseg_finish_training {rc} 3 {run}"], cwd=REPO,
                       env=env, capture_output=True, text=True, timeout=30)
    assert r.returncode == status, r.stderr
    calls = (tmp_path / "scontrol.calls").read_text() if (tmp_path / "scontrol.calls").exists() else ""
    assert calls == ("requeue 42\n" if requeued else "")
    if rc == 1:
        assert "training failed with exit status 1" in r.stderr
        assert "cause: distributed: rank 1 stopped answering" in r.stderr

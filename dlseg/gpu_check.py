"""``python -m dlseg.gpu_check``: the paths CPU tests cannot reach, checked on one machine (``launch/gpu_check.sh``).

For each precision (``no``, ``fp16`` with loss scaling, ``bf16``) a small U-Net trains on a synthetic store with
channels_last and augmentation on the device (organ contrast included): 2 epochs uninterrupted, and 1 epoch then
``--epochs 2 --resume auto``; the resumed run's final weights must lie within ``RESUME_TOL`` of the uninterrupted
run's. With two or more GPUs a 2-process DDP run trains too. The fp32 model then predicts the validation cases on the device and on
the CPU: probabilities within ``PROB_TOL``, labels differing on at most ``LABEL_TOL`` of the voxels.

``--device cpu --quick`` runs the same logic on the CPU with tiny sizes (the test suite does; fp16 and DDP are
then skipped). Writes ``OUT/gpu-check.json`` and ``OUT/gpu-check.md``; exit 0 all checks passed, 1 a check
failed, 2 unusable arguments or no CUDA device.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from safetensors.torch import load_file

from dlseg.checkpoint import list_checkpoints
from dlseg.config import option, parse_args
from dlseg.console import console, run_entry
from dlseg.errors import UsageError, one_line
from dlseg.export import load_exported
from dlseg.fileio import atomic_write
from dlseg.inference.predictor import Predictor
from dlseg.preprocessing.synthetic_store import synthetic_store
from dlseg.store import Store

PRECISIONS = ("no", "fp16", "bf16")
CHECKS = ("train", "ddp", "predict")
# max |w_resumed - w_uninterrupted| / max |w| over all tensors: a resume must continue the same run. fp32 differs
# only by nondeterministic GPU kernels; low precision rounds each of those differences more coarsely.
RESUME_TOL = {"no": 1e-3, "fp16": 2e-2, "bf16": 2e-2}
PROB_TOL = 2e-2        # max |p_device - p_cpu| (TF32 convolutions on the GPU round inputs to 10 bits)
LABEL_TOL = 1e-3       # fraction of voxels whose label differs between device and CPU prediction


@dataclass
class GpuCheckConfig:
    """The flags of ``python -m dlseg.gpu_check``."""

    out: str = option("result folder: gpu-check.json, gpu-check.md, the runs under work/", positional=True,
                      flag="OUT")
    device: str = option("where models run", "cuda", choices=("cuda", "cpu"))
    quick: bool = option("tiny sizes and few slices (the CPU test)", False)
    precisions: tuple[str, ...] = option(f"comma list of {', '.join(PRECISIONS)}", PRECISIONS)
    checks: tuple[str, ...] = option(f"comma list of {', '.join(CHECKS)}", CHECKS)
    data: str | None = option("store to train and predict on", None,
                              default_help="a synthetic store built under OUT/work/")
    model: str | None = option("exported model for the prediction check", None,
                               default_help="the fp32 model of the train check")
    bench_json: str | None = option("launch/bench_gpu.sh's JSON, folded into the report", None)
    bench_exit: int | None = option("exit status of launch/bench_gpu.sh", None)

    def check(self) -> None:
        bad = [p for p in self.precisions if p not in PRECISIONS] + [c for c in self.checks if c not in CHECKS]
        if bad:
            raise UsageError(f"--precisions/--checks: unknown {', '.join(bad)} (precisions {', '.join(PRECISIONS)}; "
                             f"checks {', '.join(CHECKS)})")
        if self.data and not (Path(self.data) / "zarr.json").is_file():
            raise UsageError(f"--data {self.data}: not a dlseg store")
        if self.device == "cuda" and not torch.cuda.is_available():
            raise UsageError("gpu_check: no CUDA device visible to torch; run it on a GPU machine "
                             "(or --device cpu --quick for the logic alone)")


@dataclass
class Result:
    """One check: passed, failed or skipped, with a one-line detail and its figures."""

    name: str
    status: str                                   # passed | failed | skipped
    detail: str
    figures: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0


@dataclass
class Sizes:
    """Model and data sizes of the training runs."""

    width: int
    depth: int
    size: int
    batch: int
    patients: int

    @classmethod
    def of(cls, quick: bool) -> Sizes:
        return cls(4, 2, 32, 4, 3) if quick else cls(16, 3, 128, 16, 6)


class Checker:
    """Runs the checks in a work folder; each check is one method returning a :class:`Result`."""

    def __init__(self, cfg: GpuCheckConfig):
        self.cfg, self.sizes = cfg, Sizes.of(cfg.quick)
        self.out = Path(cfg.out)
        self.work = self.out / "work"
        self.env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1]), "OMP_NUM_THREADS": "2"}
        if cfg.device == "cpu":     # one thread each: two runs train side by side
            self.env.update(CUDA_VISIBLE_DEVICES="", ACCELERATE_USE_CPU="true", OMP_NUM_THREADS="1")
        self.store: Path | None = Path(cfg.data) if cfg.data else None
        self.fp32_model: Path | None = Path(cfg.model) if cfg.model else None

    def data(self) -> Path:
        """The synthetic store every run trains on (built once under work/)."""
        if self.store is None:
            s = self.sizes
            self.store = synthetic_store(self.work / "synthetic", patients=s.patients, seed=0, val_fraction=0.34,
                                         size_range=(48, 64) if self.cfg.quick else (160, 256),
                                         slices_range=(8, 10) if self.cfg.quick else (24, 32))
        return self.store

    def start(self, run: Path, precision: str, epochs: int, *extra: str,
              launcher: tuple[str, ...] = ()) -> tuple[subprocess.Popen, Path]:
        """Start one training run in a fresh process, its output appended to ``<run>.log``."""
        s = self.sizes
        cmd = [*(launcher or (sys.executable,)), "-m", "dlseg.train", "--data", str(self.data()), "--out", str(run),
               "--epochs", str(epochs), "--mixed-precision", precision, "--model.base-width", str(s.width),
               "--model.depth", str(s.depth), "--model.channels-last", "true", "--loader.size", str(s.size),
               "--loader.batch-size", str(s.batch), "--loader.val-batch-size", str(2 * s.batch),
               "--loader.workers", "0", "--augment-on", "device", "--augment.organ-contrast", "0.3",
               "--checkpoint-every-steps", "0", *extra]
        run.parent.mkdir(parents=True, exist_ok=True)
        log = run.parent / f"{run.name}.log"
        with open(log, "a") as f:
            return subprocess.Popen(cmd, env=self.env, stdout=f, stderr=subprocess.STDOUT), log

    @staticmethod
    def finish(proc: subprocess.Popen, log: Path) -> None:
        """Wait for a training run; RuntimeError with its last line and log on a non-zero exit."""
        code = proc.wait(timeout=600)
        if code != 0:
            last = (log.read_text(errors="replace").strip().splitlines() or ["no output"])[-1]
            raise RuntimeError(f"training exited {code}: {last} (log: {log})")

    def train(self, run: Path, precision: str, epochs: int, *extra: str, launcher: tuple[str, ...] = ()) -> None:
        """One training run, waited for."""
        self.finish(*self.start(run, precision, epochs, *extra, launcher=launcher))

    def check_train(self, precision: str) -> Result:
        """Train, and resume: 2 epochs vs 1 + resume to 2; final weights within RESUME_TOL; losses finite."""
        base = self.work / f"train-{precision}"
        self.data()
        started = [self.start(base / "full", precision, 2), self.start(base / "resumed", precision, 1)]
        for proc, log in started:                        # the two independent runs share the machine
            self.finish(proc, log)
        self.train(base / "resumed", precision, 2, "--resume", "auto")
        rows = [json.loads(line) for line in (base / "full" / "metrics.jsonl").read_text().splitlines() if line]
        losses = [r["train_loss"] for r in rows]
        diff = relative_difference(final_weights(base / "full"), final_weights(base / "resumed"))
        figures = {"epochs": len(rows), "train_loss": losses, "nonfinite_skipped": sum(r.get("nonfinite_skipped", 0)
                   for r in rows), "resume_max_rel_diff": diff, "tolerance": RESUME_TOL[precision]}
        if precision == "no":
            self.fp32_model = base / "full" / "model"
        ok = len(rows) == 2 and all(np.isfinite(losses)) and diff <= RESUME_TOL[precision]
        return Result(f"train + resume, {precision}", "passed" if ok else "failed",
                      f"losses {', '.join(f'{v:.4f}' for v in losses)}; resumed vs uninterrupted max relative "
                      f"weight difference {diff:.2e} (tolerance {RESUME_TOL[precision]:.0e})", figures)

    def check_ddp(self) -> Result:
        """Two processes on two GPUs (skipped with fewer)."""
        gpus = torch.cuda.device_count() if self.cfg.device == "cuda" else 0
        if gpus < 2:
            return Result("DDP, 2 processes", "skipped", f"{gpus} GPU(s) visible; needs 2")
        launcher = (sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
                    "--num_machines", "1", "--mixed_precision", "bf16", "--dynamo_backend", "no")
        run = self.work / "ddp"
        self.train(run, "bf16", 1, launcher=launcher)
        row = json.loads((run / "metrics.jsonl").read_text().splitlines()[0])
        ok = row.get("world_size") == 2 and np.isfinite(row["train_loss"])
        return Result("DDP, 2 processes", "passed" if ok else "failed",
                      f"world size {row.get('world_size')}, train loss {row['train_loss']:.4f}", row)

    def check_predict(self) -> Result:
        """The fp32 model on the device vs on the CPU, over the validation cases."""
        if self.fp32_model is None:
            self.check_train("no")
        model, exported = load_exported(self.fp32_model)
        store = Store(self.data())
        device = "cuda" if self.cfg.device == "cuda" else "cpu"
        on_device = Predictor(model, exported.meta, device=device)
        on_cpu = Predictor(load_exported(self.fp32_model)[0], exported.meta, device="cpu")
        worst_p, differing, voxels = 0.0, 0, 0
        for cid in store.split_cases("val"):
            image = store.read_case(cid, mask=False)[0]
            labels_d, probs_d = on_device.predict_volume(image, batch_size=8 * self.sizes.batch)
            labels_c, probs_c = on_cpu.predict_volume(image)
            worst_p = max(worst_p, float(np.abs(probs_d - probs_c).max()))
            differing += int((labels_d != labels_c).sum())
            voxels += labels_c.size
        frac = differing / max(voxels, 1)
        ok = voxels > 0 and worst_p <= PROB_TOL and frac <= LABEL_TOL
        return Result(f"prediction {device} vs cpu", "passed" if ok else "failed",
                      f"max probability difference {worst_p:.2e} (tolerance {PROB_TOL:.0e}); labels differ on "
                      f"{differing} of {voxels} voxels (tolerance {LABEL_TOL:.0e})",
                      {"max_prob_diff": worst_p, "label_diff_fraction": frac, "voxels": voxels})

    def bench(self) -> Result:
        """launch/bench_gpu.sh's outcome, as the shell script ran it."""
        ok = self.cfg.bench_exit == 0
        figures = {"exit": self.cfg.bench_exit, "json": self.cfg.bench_json}
        return Result("python -m dlseg.bench, full width, 256 px", "passed" if ok else "failed",
                      f"exit status {self.cfg.bench_exit}; figures in {self.cfg.bench_json}", figures)

    def plan(self) -> list[tuple[str, Callable[[], Result]]]:
        """The checks to run, in order."""
        steps: list[tuple[str, Callable[[], Result]]] = []
        if "train" in self.cfg.checks:
            for p in self.cfg.precisions:
                if p == "fp16" and self.cfg.device == "cpu":
                    steps.append((f"train {p}", lambda p=p: Result(f"train + resume, {p}", "skipped",
                                                                   "fp16 loss scaling needs CUDA")))
                else:
                    steps.append((f"train {p}", lambda p=p: self.check_train(p)))
        if "ddp" in self.cfg.checks:
            steps.append(("ddp", self.check_ddp))
        if "predict" in self.cfg.checks:
            steps.append(("predict", self.check_predict))
        if self.cfg.bench_exit is not None:
            steps.append(("bench", self.bench))
        return steps


def final_weights(run: Path) -> dict[str, torch.Tensor]:
    """The weights of a run's newest checkpoint (its state after the last epoch)."""
    found = list_checkpoints(run)
    if not found:
        raise RuntimeError(f"{run}: no checkpoint written")
    return load_file(str(found[-1] / "model.safetensors"))


def relative_difference(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    """max |a - b| / max |a| over every floating tensor (inf when the names differ)."""
    if a.keys() != b.keys() or not a:
        return float("inf")
    floats = [k for k in a if a[k].is_floating_point()]
    diff = max(float((a[k].float() - b[k].float()).abs().max()) for k in floats)
    scale = max(float(a[k].float().abs().max()) for k in floats)
    return diff / max(scale, 1e-12)


def environment(device: str) -> dict[str, Any]:
    """What the checks ran on."""
    env = {"torch": torch.__version__, "device": device, "python": sys.version.split()[0]}
    if device == "cuda":
        env.update(gpu=torch.cuda.get_device_name(0), gpus=torch.cuda.device_count(), cuda=torch.version.cuda)
    return env


def write_report(out: Path, results: list[Result], env: dict[str, Any]) -> tuple[Path, Path]:
    """``gpu-check.json`` (everything) and ``gpu-check.md`` (a table), each written atomically."""
    ok = all(r.status != "failed" for r in results)
    doc = {"ok": ok, "environment": env, "tolerances": {"resume_max_rel_diff": RESUME_TOL, "max_prob_diff": PROB_TOL,
           "label_diff_fraction": LABEL_TOL}, "checks": [asdict(r) for r in results]}
    lines = [f"# GPU check: {'passed' if ok else 'FAILED'}", "", ", ".join(f"{k} {v}" for k, v in env.items()), "",
             "| check | status | detail | seconds |", "| --- | --- | --- | --- |"]
    lines += [f"| {r.name} | {r.status} | {r.detail} | {r.seconds:.0f} |" for r in results]
    out.mkdir(parents=True, exist_ok=True)
    json_path, md_path = out / "gpu-check.json", out / "gpu-check.md"
    atomic_write(json_path, json.dumps(doc, indent=1))
    atomic_write(md_path, "\n".join(lines) + "\n")
    return json_path, md_path


def run(cfg: GpuCheckConfig) -> int:
    """Every check in order (one that raises fails alone); the report; 0 when none failed, else 1."""
    cfg.check()
    checker, results = Checker(cfg), []
    for name, step in checker.plan():
        t0 = time.perf_counter()
        try:
            result = step()
        except (RuntimeError, OSError, ValueError, subprocess.TimeoutExpired) as e:
            result = Result(name, "failed", one_line(e))
        result.seconds = time.perf_counter() - t0
        results.append(result)
        colour = {"passed": "green", "failed": "red", "skipped": "yellow"}[result.status]
        console.print(f"[{colour}]{result.status}[/] {result.name}: {result.detail}", highlight=False)
    json_path, md_path = write_report(Path(cfg.out), results, environment(cfg.device))
    console.print(f"report: {md_path} and {json_path}", highlight=False)
    return 1 if any(r.status == "failed" for r in results) else 0


def main(argv: list[str] | None = None) -> int:
    return run_entry(lambda: run(parse_args(GpuCheckConfig, argv, "python -m dlseg.gpu_check", __doc__.split("\n")[0])))


if __name__ == "__main__":
    sys.exit(main())

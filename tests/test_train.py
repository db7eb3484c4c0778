"""Training: config precedence/errors, a tiny run's outputs, exact resume, preemption, non-finite stop, 2 ranks."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import types
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import yaml
from accelerate.utils import InitProcessGroupKwargs

from dlseg import checkpoint as ckpt
from dlseg import curves, trainer
from dlseg.config import ConfigError, from_dict
from dlseg.data import DataConfig, EpochSampler, build_train_loader, build_val_loader
from dlseg.distributed import check_launch
from dlseg.export import export_model, load_model
from dlseg.optim import SchedConfig, lr_factor
from dlseg.preemption import EXIT_PREEMPTED, PREEMPTED_MARKER
from dlseg.runlog import data_wait_hint, missed_class_warnings
from dlseg.store import CaseData, Store
from dlseg.task import ensure_synthetic
from dlseg.train import main as train_main
from dlseg.train import parse
from dlseg.train_config import TrainConfig, accelerator_kwargs, set_cpu_threads
from dlseg.validation import ValidationCounts, confusion_counts, dice_per_case, evaluate
from helpers import TINY_RUN, assert_same_weights, read_weights, write_store

REPO = Path(__file__).resolve().parents[1]
TRAIN = str(REPO / "dlseg" / "train.py")
TINY = [*TINY_RUN, "--loader.workers", "0", "--optim.lr", "1e-3", "--sched.step_size", "1", "--sched.gamma", "0.5",
        "--keep_last", "1"]


def tiny(store: Path, out: Path, *extra: str) -> list[str]:
    """Arguments of a tiny CPU run on the test store."""
    return ["--data", str(store), "--out", str(out), *TINY, *extra]


def final_weights(run: Path) -> dict[str, torch.Tensor]:
    """Model weights in the newest checkpoint of a run."""
    return read_weights(ckpt.list_checkpoints(run)[-1] / "model.safetensors")


@pytest.fixture(scope="module")
def reference_run(synthetic_store, tmp_path_factory) -> Path:
    """An uninterrupted 2-epoch run (CPU augmentation on), the reference for the resume tests."""
    out = tmp_path_factory.mktemp("train") / "ref"
    assert trainer.run(parse(tiny(synthetic_store, out, "--epochs", "2"))) == 0
    return out


# ---------------------------------------------------------------------------------------------- config

def test_config_precedence_defaults_recipe_cli(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("epochs: 7\noptim:\n  lr: 0.002\nloader:\n  size: 64\n")
    cfg = parse(["--config", str(recipe), "--optim.lr", "3e-3", "--out", "runs/x"])
    assert (cfg.epochs, cfg.optim.lr, cfg.loader.size, cfg.out) == (7, 3e-3, 64, "runs/x")
    assert cfg.sched.step_size == 4 and cfg.mixed_precision is None        # defaults untouched
    demo = parse(["--config", "demo"])
    assert demo.data is None and demo.loader.workers <= 2
    article = parse(["--config", "chaos_t1in"])
    assert (article.optim.lr, article.sched.name, article.sched.step_size, article.sched.gamma, article.epochs,
            article.mixed_precision, article.loss.name, article.model.base_width) == (
        1e-4, "step", 4, 0.1, 20, "fp16", "focal", 64)


@pytest.mark.parametrize("argv, key", [
    (["--optim.lrr", "1"], "optim.lrr"),
    (["--epochs", "two"], "epochs"),
    (["--mixed_precision", "fp8"], "mixed_precision"),
    (["--config", "no_such_recipe"], "no_such_recipe"),
    (["--epochs", "0"], "epochs"),
    (["--dist_timeout_s", "0"], "dist_timeout_s"),
    (["--trackers", "no_such_tracker"], "trackers"),
    (["--augment.hflip", "1.5"], "augment.hflip"),
    (["--augment.remap_points", "1"], "augment.remap_points"),
])
def test_config_errors_exit_2_naming_the_key(argv, key, capsys, tmp_path):
    assert train_main([*argv, "--out", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err
    assert key in err and "Traceback" not in err and len(err.strip().splitlines()) == 1


def resplit(src: Path, out: Path, val: list[str], unlabeled_val: bool = False) -> Path:
    """A copy of the store ``src`` whose split has ``val`` as val and its other labeled cases as train.

    ``unlabeled_val``: the val cases are written without their masks.
    """
    store = Store(src)
    cases = []
    for cid in store.split_cases("train") + store.split_cases("val"):
        image, mask = store.read_case(cid)
        attrs = {k: v for k, v in store.info(cid).attrs.items() if k not in ("shape", "complete", "foreground")}
        cases.append(CaseData(cid, image, None if (unlabeled_val and cid in val) else mask, attrs))
    train = [c.case_id for c in cases if c.case_id not in val]
    return write_store(out, cases, {"train": train, "val": val, "unlabeled": [], "seed": 0, "method": "fixed"},
                       store.label_map)


@pytest.mark.parametrize("unlabeled_val, says", [(False, "has no cases"), (True, "has no labeled cases")])
def test_val_split_without_labeled_cases_is_refused_before_any_output(synthetic_store, tmp_path, capsys,
                                                                      unlabeled_val, says):
    val = Store(synthetic_store).split_cases("val") if unlabeled_val else []
    store = resplit(synthetic_store, tmp_path / "noval.zarr", val, unlabeled_val)
    out = tmp_path / "run"
    assert train_main(tiny(store, out, "--epochs", "1")) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert f"{store}: split 'val' {says}: validation picks the best model" in " ".join(err.split())
    assert "--val-fraction > 0" in err and "--loader.val_split NAME" in " ".join(err.split())
    assert not (out / "model").exists() and not out.exists()


def test_organ_names_the_store_lacks_are_refused_before_any_output(synthetic_store, tmp_path, capsys):
    out = tmp_path / "run"
    argv = tiny(synthetic_store, out, "--epochs", "1", "--augment.organ_contrast", "0.5",
                "--augment.organ_labels", "liver,spleen")
    assert train_main(argv) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert "augment.organ_labels: 'spleen' is not a label of this store (it has 1 liver)" in " ".join(err.split())
    assert not out.exists()


def test_launch_trap_refused(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ConfigError, match="WORLD_SIZE"):
        check_launch(types.SimpleNamespace(num_processes=1))
    check_launch(types.SimpleNamespace(num_processes=2))


def test_mixed_precision_default_takes_the_launchers_and_explicit_wins(tmp_path):
    code = (
        "import json, sys\n"
        "from accelerate import Accelerator\n"
        "from accelerate.state import AcceleratorState\n"
        "from dlseg.train_config import TrainConfig, accelerator_kwargs\n"
        "got = []\n"
        "for mp in (None, 'no', 'fp16'):\n"
        "    got.append(Accelerator(**accelerator_kwargs(TrainConfig(mixed_precision=mp, out=sys.argv[1])))"
        ".mixed_precision)\n"
        "    AcceleratorState._reset_state(True)\n"
        "print(json.dumps(got))\n")
    env = {**os.environ, "ACCELERATE_MIXED_PRECISION": "bf16", "ACCELERATE_USE_CPU": "true"}  # as `accelerate launch`
    done = subprocess.run([sys.executable, "-c", code, str(tmp_path)], env=env, capture_output=True, text=True,
                          timeout=120, cwd=REPO)
    assert done.returncode == 0, done.stderr[-2000:]
    assert json.loads(done.stdout.strip().splitlines()[-1]) == ["bf16", "no", "fp16"]


def test_dist_timeout_builds_the_process_group_kwargs():
    cfg = parse(["--dist_timeout_s", "42"])
    (handler,) = accelerator_kwargs(cfg)["kwargs_handlers"]
    assert isinstance(handler, InitProcessGroupKwargs)
    assert handler.to_kwargs() == {"timeout": timedelta(seconds=42)}          # backend left to Accelerate
    assert TrainConfig().dist_timeout_s == 1800


def test_schedules():
    s = SchedConfig(name="step", step_size=4, gamma=0.1)
    assert [round(lr_factor(s, e, 20), 6) for e in (0, 3, 4, 8)] == [1, 1, 0.1, 0.01]
    c = SchedConfig(name="cosine", warmup_epochs=2)
    assert lr_factor(c, 0, 12) == pytest.approx(1 / 3) and lr_factor(c, 2, 12) == 1.0
    assert lr_factor(c, 12, 12) == pytest.approx(0.0)


def test_dice_from_counts():
    logits = torch.tensor([[[[5.0, -5.0], [5.0, -5.0]]], [[[-5.0, -5.0], [-5.0, -5.0]]]])
    mask = torch.tensor([[[1, 1], [0, 0]], [[0, 0], [0, 0]]])
    counts = confusion_counts(logits, mask, 1)
    assert counts.tolist() == [[[1, 1, 1]], [[0, 0, 0]]]
    table = torch.tensor([[[1, 1, 1]], [[0, 0, 0]]])          # per case, per class: [TP, FP, FN]
    assert dice_per_case(table) == [pytest.approx(0.5), 1.0]


# ---------------------------------------------------------------------------------------------- runs

def test_run_writes_everything(reference_run, synthetic_store):
    out = reference_run
    rows = curves.read_metrics(out)
    assert [r["epoch"] for r in rows] == [0, 1] and all(r["world_size"] == 1 for r in rows)
    assert set(rows[0]["val_dice"]) == set(Store(synthetic_store).split_cases("val"))
    assert all(0.0 <= r["val_dice_mean"] <= 1.0 and 0.0 <= r["data_wait_fraction"] <= 1.0 for r in rows)
    assert [r["lr"] for r in rows] == [1e-3, 5e-4]                             # StepLR per epoch
    assert (out / "curves.png").read_bytes()[:4] == b"\x89PNG"
    assert "world size 1" in (out / "train.log").read_text()
    saved = from_dict(TrainConfig, yaml.safe_load((out / "config.yaml").read_text()))
    assert saved == parse(tiny(synthetic_store, out, "--epochs", "2"))
    names = [p.name for p in ckpt.list_checkpoints(out)]
    best = max(rows, key=lambda r: r["val_dice_mean"])
    assert names[-1] == ckpt.checkpoint_name(rows[-1]["global_step"])
    assert len(names) <= 2 and ckpt.checkpoint_name(best["global_step"]) in names   # last K=1 + best
    model, meta = load_model(out / "model")
    assert meta["epoch"] == best["epoch"] + 1 and meta["val_dice"] == best["val_dice_mean"]
    assert meta["labels"] == "liver" and meta["modality"] == "MR" and meta["sequence"] == "t1-in"
    assert meta["arch"]["num_classes"] == 1 and meta["train_size"] == 32 and meta["threshold"] == 0.5


def test_resume_after_epoch_1_equals_uninterrupted(reference_run, synthetic_store, tmp_path):
    out = tmp_path / "split"
    assert trainer.run(parse(tiny(synthetic_store, out, "--epochs", "1"))) == 0
    (first,) = curves.read_metrics(out)
    assert trainer.run(parse(tiny(synthetic_store, out, "--epochs", "2", "--resume", "auto"))) == 0
    assert_same_weights(final_weights(out), final_weights(reference_run))
    ref, got = curves.read_metrics(reference_run), curves.read_metrics(out)
    assert [r["val_dice"] for r in got] == [r["val_dice"] for r in ref]
    assert got[0] == first                        # epoch 1 resumed from its checkpoint, not trained again
    assert "resumed from" in (out / "train.log").read_text()


def test_export_last_exports_the_final_epoch_and_switches_a_finished_run(reference_run, synthetic_store, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(reference_run, out, symlinks=True)
    model, meta = load_model(out / "model")
    export_model(model, {**meta, "epoch": 1}, out / "model")      # as if epoch 1 had been the best
    rows = curves.read_metrics(out)
    for _ in range(2):       # the finished run re-exports its final weights once, then has nothing to do
        assert trainer.run(parse(tiny(synthetic_store, out, "--epochs", "2", "--resume", "auto",
                                      "--export_model", "last"))) == 0
        _, meta = load_model(out / "model")
        assert meta["epoch"] == 2 and meta["selected"] == "last"
        assert meta["val_dice"] == rows[-1]["val_dice_mean"]      # the final weights validated again, same value
        assert_same_weights(read_weights(out / "model" / "model.safetensors"), final_weights(out))
    assert (out / "train.log").read_text().count("exported the last epoch's model (2)") == 1
    assert curves.read_metrics(out) == rows                       # no epoch trained or recorded


def test_sigusr1_saves_exits_75_and_resume_matches(reference_run, synthetic_store, tmp_path):
    out = tmp_path / "preempt"
    proc = subprocess.Popen([sys.executable, TRAIN, *tiny(synthetic_store, out, "--epochs", "2",
                                                            "--checkpoint_every_steps", "2")],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not ckpt.list_checkpoints(out) and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGUSR1)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == EXIT_PREEMPTED, err
    marker = json.loads((out / PREEMPTED_MARKER).read_text())
    assert marker["exit"] == EXIT_PREEMPTED
    assert trainer.run(parse(tiny(synthetic_store, out, "--epochs", "2", "--resume", "auto"))) == 0
    assert not (out / PREEMPTED_MARKER).exists()
    assert f"resumed from {out / ckpt.CHECKPOINTS / marker['checkpoint']} " in (out / "train.log").read_text()
    assert_same_weights(final_weights(out), final_weights(reference_run))
    assert [r["epoch"] for r in curves.read_metrics(out)] == [0, 1]


def test_nonfinite_losses_stop_the_run(synthetic_store, tmp_path):
    cfg = parse(tiny(synthetic_store, tmp_path / "nan", "--epochs", "1", "--optim.lr", "1e30",
                     "--max_nonfinite", "2", "--augment.enabled", "false"))
    with pytest.raises(trainer.TrainingError, match="2 non-finite losses in a row"):
        trainer.run(cfg)


# ---------------------------------------------------------------------------------------------- 2 ranks

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_cpu_ranks(synthetic_store, tmp_path):
    out = tmp_path / "ddp"
    env = {**os.environ, "ACCELERATE_USE_CPU": "true", "OMP_NUM_THREADS": "1"}
    cmd = ["accelerate", "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
           "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(_free_port()),
           TRAIN, *tiny(synthetic_store, out, "--epochs", "1", "--debug_shards", "true", "--dist_timeout_s", "120")]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    (row,) = curves.read_metrics(out)
    assert row["world_size"] == 2
    records = {}
    for rank in (0, 1):
        (rec,) = [json.loads(x) for x in (out / "debug" / f"rank{rank}.jsonl").read_text().splitlines()]
        assert rec["world_size"] == 2 and rec["rank"] == rank
        records[rank] = rec
    assert records[0]["weights"] == records[1]["weights"]                       # identical weights on both ranks

    # Shards: rank r trained on batches r, r+2, … of the single-process epoch order; together all of them.
    cfg = DataConfig(size=32, workers=0, batch_size=4)
    dataset = build_train_loader(synthetic_store, cfg, seed=0).dataset
    order = EpochSampler(dataset, seed=0).order(0).tolist()
    ids = [f"{dataset.case_ids[c]}:{z}" for c, z in dataset.index[order].tolist()]
    batches = [ids[i:i + 4] for i in range(0, len(ids) - len(ids) % 4, 4)]
    batches = batches[:len(batches) - len(batches) % 2]
    assert records[0]["batches"] == batches[0::2] and records[1]["batches"] == batches[1::2]
    seen = [s for r in (0, 1) for b in records[r]["batches"] for s in b]
    assert len(seen) == len(set(seen)) == 4 * len(batches) >= len(ids) - 8

    # Validation Dice over 2 ranks equals one process on the same weights.
    model, meta = load_model(out / "model")
    val = build_val_loader(synthetic_store, cfg)
    counts = evaluate(model, val, ValidationCounts(len(val.dataset.case_ids), 1))
    assert counts.slices.tolist() == val.dataset.depths.tolist()
    assert dict(zip(val.dataset.case_ids, counts.compute().dice)) == row["val_dice"]
    assert meta["val_dice"] == row["val_dice_mean"]


def test_options_accumulation_clipping_device_augment_channels_last(synthetic_store, tmp_path):
    out = tmp_path / "opts"
    cfg = parse(tiny(synthetic_store, out, "--epochs", "1", "--grad_accum", "2", "--clip_grad", "1.0",
                     "--augment_on", "device", "--model.channels_last", "true", "--sched.name", "cosine",
                     "--sched.warmup_epochs", "1", "--optim.name", "adamw", "--optim.weight_decay", "0.01"))
    assert trainer.run(cfg) == 0
    (row,) = curves.read_metrics(out)
    store = Store(synthetic_store)
    n_batches = sum(store.info(c).shape[0] for c in store.split_cases("train")) // 4
    assert row["global_step"] == (n_batches + 1) // 2                            # one optimizer step per 2 batches
    assert row["lr"] == pytest.approx(1e-3 / 2)                                  # warm-up epoch 0: lr/(1+1)
    _, meta = load_model(out / "model")
    assert meta["channels_last"] is True


def test_cpu_threads_leave_cores_to_loader_workers(monkeypatch):
    before = torch.get_num_threads()
    fake = types.SimpleNamespace(device=torch.device("cpu"))
    cores = len(os.sched_getaffinity(0))
    try:
        monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
        monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
        cfg = TrainConfig()
        cfg.loader.workers = 1
        assert set_cpu_threads(fake, cfg) == max(1, cores - 1) == torch.get_num_threads()
        cfg.cpu_threads = 3
        assert set_cpu_threads(fake, cfg) == 3
        monkeypatch.setenv("OMP_NUM_THREADS", "1")
        cfg.cpu_threads = 0
        assert set_cpu_threads(fake, cfg) == 3                    # left as it is
    finally:
        torch.set_num_threads(before)


def test_ensure_synthetic_writes_t1_in_only_once(tmp_path):
    cfg = parse(["--out", str(tmp_path / "runs" / "demo"), "--synthetic.patients", "2",
                 "--synthetic.val_fraction", "0.5"])
    store_path = ensure_synthetic(cfg)
    assert store_path == tmp_path / "runs" / "_synthetic" / "mr-p2-s0-v0.5" / "t1in.zarr"
    store = Store(store_path)
    assert sorted(store.split_cases("train") + store.split_cases("val")) == ["MR-1-T1in", "MR-2-T1in"]
    chaos = store_path.parent / "chaos" / "Train_Sets" / "MR" / "1"
    assert (chaos / "T1DUAL" / "DICOM_anon" / "InPhase").is_dir()
    assert not (chaos / "T1DUAL" / "DICOM_anon" / "OutPhase").exists() and not (chaos / "T2SPIR").exists()
    before = (store_path / "zarr.json").stat().st_mtime_ns
    assert ensure_synthetic(cfg) == store_path                       # reused, not regenerated
    assert (store_path / "zarr.json").stat().st_mtime_ns == before


def test_data_wait_hint_names_the_cure_for_the_setup():
    cpu = data_wait_hint(0.42, "cpu", 2)
    assert cpu.startswith("hint: 42 % of step time") and "raise loader.workers (now 2)" in cpu
    assert "--augment_on device" in cpu
    device_workers = data_wait_hint(0.5, "device", 4)
    assert "--loader.workers 0" in device_workers and "4 loader worker(s)" in device_workers
    device_main = data_wait_hint(0.6, "device", 0)
    assert "first epoch" in device_main and "loader.cache_mb" in device_main and "--loader.workers 0" not in device_main


def test_a_structure_not_learned_by_the_last_epoch_is_named():
    lines = missed_class_warnings({"liver": 0.91, "right kidney": 0.0, "spleen": 0.049, "left kidney": 0.05})
    assert [line.split(":")[1].strip() for line in lines] == ["right kidney", "spleen"]
    assert lines[0].startswith("warning: right kidney: validation Dice 0.00 at the last epoch")
    assert "--seed" in lines[1]
    assert missed_class_warnings({"liver": 0.2}) == []

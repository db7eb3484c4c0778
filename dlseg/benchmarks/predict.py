"""Predict stage: end-to-end slices/s from DICOM folders to PNG files vs the forward pass alone and vs one slice
at a time; prediction memory at a small and a large cohort.

* ``end_to_end``: ``predict_cohort`` on a CHAOS tree (DICOM + PNG out, case-loading workers, packed
  batches, writer threads), in a fresh process so that its peak memory is its own; the rate is the prediction
  loop's (first case read → last PNG written, as the run reports it); ``end_to_end_wall`` is the whole call
  (model loading, discovery, worker start-up included);
* ``forward_ceiling``: ``forward_in_memory``: the same model, precision and batch size over the same
  cases' slices already prepared and on the device;
* ``slice_by_slice``: ``slicewise_baseline``, the article's predict: read a series, one slice per forward
  pass, one PNG per slice.

The model has the benchmark's architecture with random weights whose output layer is rescaled so that logits
spread over about ±8 (masks with structure, like a trained model's): speed does not depend on the weights.
The large cohort repeats the synthetic patients (symlinked folders) to reach its case count.
"""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

import cv2
import numpy as np
import torch

from dlseg.export import export_model
from dlseg.inference import outputs
from dlseg.inference.config import PredictConfig
from dlseg.inference.predictor import Predictor
from dlseg.inference.runner import predict_cohort
from dlseg.model import build_model
from dlseg.normalize import NormConfig
from dlseg.sources.dicom import read_series
from dlseg.sources.layout import discover
from dlseg.store import Store

from .common import BenchConfig, BenchSkip, Cohort, Comparison, StageResult, Timing, isolated, memory_check, \
    quiet_console, replicated_tree, sync


def export_bench_model(cfg: BenchConfig, out: Path) -> Path:
    """A U-Net of the benchmark's size with random weights (output spread ±8), exported like a trained one."""
    torch.manual_seed(cfg.seed)
    arch = {"name": "unet", "in_channels": 1, "num_classes": 1, "base_width": cfg.base_width, "depth": cfg.depth,
            "bilinear": True}
    model = build_model(arch).eval()
    with torch.no_grad():
        y = model(torch.randn(4, 1, cfg.size, cfg.size))
        k = 4.0 / float(y.std())
        model.outc.conv.weight.mul_(k)
        model.outc.conv.bias.copy_((model.outc.conv.bias - y.mean()) * k)
    meta = {"arch": arch, "normalization": NormConfig().to_dict(), "train_size": cfg.size, "context_slices": 0,
            "labels": "liver", "modality": "MR", "sequence": "t1-in", "threshold": 0.5,
            "channels_last": cfg.channels_last, "epoch": 0, "val_dice": 0.0, "store_fingerprint": "benchmark"}
    return export_model(model, meta, out)


def end_to_end(model: str, tree: str, out: str, cfg: BenchConfig) -> dict:
    """``predict_cohort`` DICOM → PNG into a fresh folder; slices, seconds and the loop's own figures."""
    shutil.rmtree(out, ignore_errors=True)
    pc = PredictConfig(model=model, input=tree, out=out, input_kind="chaos", batch_size=cfg.predict_batch_size,
                       workers=cfg.predict_workers, mixed_precision=cfg.mixed_precision)
    start = time.perf_counter()
    with quiet_console():
        totals = predict_cohort(pc)
    seconds = time.perf_counter() - start
    shutil.rmtree(out, ignore_errors=True)
    if totals is None or totals["failed"]:
        raise RuntimeError(f"{tree}: prediction failed for {totals and totals['failed']} case(s)")
    return {"slices": int(totals["slices_predicted"]), "seconds": seconds, "cases": int(totals["predicted"]),
            "loop_images_per_s": totals["images_per_s"], "data_wait_fraction": totals["data_wait_fraction"],
            "startup_s": totals.get("startup_s")}


def loop_timing(e2e: dict) -> Timing:
    """The prediction loop's own rate (first case read → last PNG written) as a timing."""
    return Timing(e2e["slices"], e2e["slices"] / e2e["loop_images_per_s"])


def forward_in_memory(predictor: Predictor, slices: torch.Tensor, batch_size: int) -> int:
    """The ceiling: the forward pass alone over in-memory (N, C, S, S) slices; returns N."""
    for i in range(0, slices.shape[0], batch_size):
        predictor.probabilities(slices[i:i + batch_size])
    if predictor.device.type == "cuda":
        torch.cuda.synchronize(predictor.device)
    return int(slices.shape[0])


def slicewise_baseline(predictor: Predictor, files: list[str | os.PathLike], out_dir: str | os.PathLike,
                       label_value: int = outputs.LIVER_GRAY) -> int:
    """The article's way: read a series, then one slice per forward pass and one PNG per slice."""
    labels = predictor.segment(read_series(files).image, batch_size=1)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    values = outputs.png_values(labels, predictor.num_classes, label_value)
    for name, sl in zip(outputs.slice_names(len(values)), values):
        cv2.imwrite(str(out / name), sl)
    return int(labels.shape[0])


def ceiling_pass(predictor: Predictor, slices: torch.Tensor, cfg: BenchConfig) -> Timing:
    """The forward pass alone over slices already on the device."""
    sync(cfg.device)
    start = time.perf_counter()
    n = forward_in_memory(predictor, slices, cfg.predict_batch_size)
    return Timing(n, time.perf_counter() - start)


def prepared_slices(predictor: Predictor, store_path: Path) -> torch.Tensor:
    """Every case of the store prepared exactly as prediction prepares it: (N, 1, S, S) float32."""
    store = Store(store_path)
    volumes = []
    for cid in store.cases:
        image, _ = store.read_case(cid, mask=False)
        volumes.append(predictor.prepare(image, store.info(cid).attrs.get("stats"))[0])
    return torch.from_numpy(np.concatenate(volumes))[:, None]


def add_comparisons(res: StageResult, large_n: int) -> None:
    """End to end against the forward pass alone and against one slice at a time."""
    res.compare(Comparison("end-to-end DICOM→PNG (prediction loop) vs forward pass alone (ceiling)", "end_to_end",
                           "forward_ceiling", "fraction of the model's in-memory speed kept end to end, from the "
                           "first case read to the last PNG written", goal_min=0.8))
    res.compare(Comparison("end-to-end DICOM→PNG (whole call, start-up included) vs forward pass alone",
                           "end_to_end_wall", "forward_ceiling", "the same, counting model loading, discovery and "
                           "worker start-up (they weigh more the smaller the cohort)"))
    res.compare(Comparison("end-to-end DICOM→PNG vs one slice at a time (article)", "end_to_end", "slice_by_slice",
                           "times faster than the article's predict loop"))
    res.compare(Comparison(f"end-to-end on {large_n} cases (prediction loop) vs forward pass alone",
                           f"end_to_end_{large_n}_cases", "forward_ceiling", "the same at the larger cohort"))


def add_memory(res: StageResult, cfg: BenchConfig, mem_small: dict, mem_large: dict) -> None:
    """Peak memory at both cohort sizes; with isolated runs, the check that it does not grow with the cohort."""
    small_n, large_n = cfg.memory_cases
    res.memory = {f"{small_n}_cases_main_peak_rss_mb": mem_small["peak_rss_mb"],
                  f"{large_n}_cases_main_peak_rss_mb": mem_large["peak_rss_mb"],
                  f"{small_n}_cases_worker_peak_rss_mb": mem_small["children_peak_rss_mb"],
                  f"{large_n}_cases_worker_peak_rss_mb": mem_large["children_peak_rss_mb"]}
    if cfg.isolate:
        res.memory_checks.append(memory_check(
            f"prediction peak memory, {large_n} vs {small_n} cases (main process)", mem_large["peak_rss_mb"],
            mem_small["peak_rss_mb"], 1.10,
            "peak RSS at the large cohort ÷ at the small one; ≤ 1.10 = does not grow"))
        if cfg.predict_workers > 0:   # no loader processes: cases are loaded in the main process
            res.memory_checks.append(memory_check(
                f"prediction peak memory, {large_n} vs {small_n} cases (largest loader worker)",
                mem_large["children_peak_rss_mb"], mem_small["children_peak_rss_mb"], 1.10,
                "the same for the case-loading worker processes"))


def run(cfg: BenchConfig, cohort: Cohort) -> StageResult:
    """Measure end-to-end prediction, its ceiling and the slice-by-slice baseline; memory at two cohort sizes."""
    if cohort.chaos is None:
        raise BenchSkip("needs DICOM folders (--source) to predict from")
    cfg = cfg.with_predict_defaults()   # a no-op when parse_args already filled them in
    res = StageResult("predict", "slices/s")
    work = cohort.root / "scratch-predict"
    shutil.rmtree(work, ignore_errors=True)
    model_dir = export_bench_model(cfg, work / "model")
    small_n, large_n = cfg.memory_cases
    small = replicated_tree(cohort.chaos, small_n, work / f"cohort-{small_n}")
    large = replicated_tree(cohort.chaos, large_n, work / f"cohort-{large_n}")
    env = {"ACCELERATE_USE_CPU": "true"} if cfg.device == "cpu" else {}

    predictor = Predictor.load(model_dir, device=cfg.device, mixed_precision=cfg.mixed_precision)
    slices = prepared_slices(predictor, cohort.store)
    if cfg.quick:
        slices = slices[:4 * cfg.predict_batch_size]
    slices = slices.to(cfg.device)
    forward_in_memory(predictor, slices[:cfg.predict_batch_size], cfg.predict_batch_size)   # warm-up
    half = (len(slices) // 2 // cfg.predict_batch_size) * cfg.predict_batch_size or len(slices)

    # The ceiling is timed in two halves around the end-to-end runs, so that a drifting load weighs on both.
    ceiling = [ceiling_pass(predictor, slices[:half], cfg)]
    e2e_small, mem_small = isolated(end_to_end, str(model_dir), str(small), str(work / "out-small"), cfg,
                                    isolate=cfg.isolate, env=env, threads=cfg.threads)
    e2e_large, mem_large = isolated(end_to_end, str(model_dir), str(large), str(work / "out-large"), cfg,
                                    isolate=cfg.isolate, env=env, threads=cfg.threads)
    sources = discover(small, "t1-in", "liver")[0][:1 if cfg.quick else max(1, cfg.slicewise_cases)]
    start, count = time.perf_counter(), 0
    for k, src in enumerate(sources):
        count += slicewise_baseline(predictor, src.image_files, work / "slicewise" / str(k))
    res.add("slice_by_slice", Timing(count, time.perf_counter() - start))
    if half < len(slices):
        ceiling.append(ceiling_pass(predictor, slices[half:], cfg))
    n = sum(t.items for t in ceiling)
    res.add("forward_ceiling", Timing(n, sum(t.seconds for t in ceiling)))
    res.add("end_to_end", loop_timing(e2e_small))
    res.add("end_to_end_wall", Timing(e2e_small["slices"], e2e_small["seconds"]))
    res.add(f"end_to_end_{large_n}_cases", loop_timing(e2e_large))
    shutil.rmtree(work, ignore_errors=True)

    add_comparisons(res, large_n)
    add_memory(res, cfg, mem_small, mem_large)
    res.details.update({
        "cases": e2e_small["cases"], "slices": e2e_small["slices"], "large_cases": e2e_large["cases"],
        "large_slices": e2e_large["slices"], "ceiling_slices": n, "slicewise_cases": len(sources),
        "batch_size": cfg.predict_batch_size, "workers": cfg.predict_workers, "size": cfg.size,
        "base_width": cfg.base_width, "device": cfg.device, "mixed_precision": cfg.mixed_precision,
        "loop_images_per_s": e2e_small["loop_images_per_s"], "data_wait_fraction": e2e_small["data_wait_fraction"],
        "startup_s": e2e_small["startup_s"], "wall_s": e2e_small["seconds"],
    })
    res.notes.append("end-to-end timed around predict_cohort (model load, discovery, DICOM decode, normalize, "
                     "forward, resize back, PNG writes) in a fresh process; ceiling = forward + probabilities on "
                     "prepared slices already on the device")
    return res

"""``python -m dlseg.cv``: K-fold cross-validation over a store's labeled patients, and its per-organ report.

    python -m dlseg.cv --store S.zarr --out runs/cv --folds 5 --config RECIPE [--key value ...]   # all, in turn
    python -m dlseg.cv --store S.zarr --out runs/cv --folds 5 --prepare                          # before an array
    sbatch --array=0-4 launch/train_cv.sbatch --config RECIPE            # one fold per task (STORE, CV_OUT, FOLDS)
    python -m dlseg.cv --store S.zarr --out runs/cv --folds 5 --report                           # after it

Folds are patient-level, exactly the assignment ``python -m preprocess --folds K --fold I`` makes (every labeled
subject ``<MODALITY>-<patient>`` is held out in exactly one fold; the seed defaults to the store split's). They are
recorded in the store as named splits ``cv<K>-fold<I>-train`` / ``-val`` (``Store.split_cases``; with
``--fold-seed S``: ``cv<K>-s<S>-fold<I>-…``), and fold I
trains ``<out>/fold-I`` with ``--loader.train_split`` / ``--loader.val_split`` set to them and ``--resume auto``
(a rerun continues or skips finished folds) and ``--export_model last``: the fold's validation patients are its
held-out patients, so choosing the best epoch on them would flatter the report (a rerun over folds trained with
the best-epoch export re-exports their final models). Flags not listed below are the trainer's (``dlseg/train.py``).

The report scores every fold's exported model on its own held-out cases in their original geometry (each case
once, so the per-case table pools all labeled patients) and gives the Dice per class: per fold, and pooled as
mean ± sd over cases; ``--ensemble CV_DIR`` (other folders trained on the same folds, e.g. other seeds) adds the
per-fold ensembles' pooled Dice beside the single models'; ``--keep-largest`` scores with prediction's
largest-component filter, into ``cv_report-largest.*`` beside the plain report, so the two can be compared before
choosing ``--keep_largest`` for prediction; ``--tta`` likewise scores with test-time augmentation
(``cv_report-tta.*``). Written atomically to ``<out>/cv_report.json`` and ``cv_report.md``. To predict with all
the fold models at once: ``dlseg/predict.py --model <out>/fold-0 --model <out>/fold-1 …`` (an ensemble).
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from rich.table import Table

from dlseg.config import build_parser, config_from_namespace, option
from dlseg.console import console, make_progress, run_entry
from dlseg.errors import UsageError
from dlseg.export import read_meta
from dlseg.fileio import atomic_write
from dlseg.inference.ensemble import load_predictor
from dlseg.inference.tta import tta_text
from dlseg.locks import FolderLock
from dlseg.metrics import dice
from dlseg.preprocessing.split import SplitConfig, split_patients
from dlseg.store import Store, StoreWriter
from dlseg.train import parse as parse_train
from dlseg.trainer import run as train_run

REPORT = "cv_report"


@dataclass
class CVConfig:
    """One cross-validation; its fields are the flags of ``python -m dlseg.cv`` (the rest go to the trainer)."""

    store: str = option("the dlseg Zarr store whose labeled patients are split (required)", "")
    out: str = option("cross-validation folder: fold-I/ run folders and the report (required)", "")
    folds: int = option("number of folds K", 5)
    fold: int | None = option("train only fold I, 0 ≤ I < K (one task of a job array)", None)
    fold_seed: int | None = option("seed of the fold assignment", None, default_help="the store split's seed")
    prepare: bool = option("only record the folds in the store (before submitting a job array)", False)
    report: bool = option("only write the report (every fold trained)", False)
    ensemble: tuple[str, ...] = option("another cross-validation folder trained on the same folds (e.g. with "
                                       "another --seed); repeatable: the report also scores, per fold, the ensemble "
                                       "of that fold's models (mean of probabilities)", (), repeat=True,
                                       metavar="CV_DIR")
    keep_largest: bool = option("score with the largest-component filter of dlseg/predict.py --keep_largest "
                                "(to decide by cross-validation whether to use it)", False)
    tta: bool = option("score with dlseg/predict.py's test-time augmentation over the transforms the models were "
                       "trained with (to decide by cross-validation whether to use --tta)", False)


def report_name(cfg: CVConfig) -> str:
    """``cv_report``; ``-largest`` and ``-tta`` added when scored with those options (all can coexist)."""
    return REPORT + ("-largest" if cfg.keep_largest else "") + ("-tta" if cfg.tta else "")


def split_name(cfg: CVConfig, seed: int, fold: int, side: str) -> str:
    """``cv5-fold2-train`` (``cv5-s7-fold2-train`` with ``--fold-seed 7``): a fold's split as the store names it."""
    return f"cv{cfg.folds}-fold{fold}-{side}" if cfg.fold_seed is None else f"cv{cfg.folds}-s{seed}-fold{fold}-{side}"


def fold_splits(store: Store, cfg: CVConfig, seed: int) -> dict[str, list[str]]:
    """Every fold's train and val case ids (patient-level, as ``preprocess --folds K --fold I`` assigns them)."""
    subject = {c: f"{store.info(c).attrs.get('modality')}-{store.info(c).attrs.get('patient')}"
               for c in store.cases if store.info(c).labeled}
    out = {}
    for i in range(cfg.folds):
        train_p, val_p = split_patients(sorted(set(subject.values())), SplitConfig(seed=seed, folds=cfg.folds, fold=i))
        for side, patients in (("train", set(train_p)), ("val", set(val_p))):
            out[split_name(cfg, seed, i, side)] = [c for c in sorted(subject) if subject[c] in patients]
    return out


def record_folds(cfg: CVConfig) -> int:
    """Write the folds into the store unless it already holds them; returns the seed used."""
    store = Store(cfg.store)
    seed = int(store.split.get("seed", 0)) if cfg.fold_seed is None else cfg.fold_seed
    splits = fold_splits(store, cfg, seed)
    if any(store.split.get(name) != ids for name, ids in splits.items()):
        with FolderLock(cfg.store, "python -m dlseg.cv"):
            StoreWriter(cfg.store).add_splits(splits)
    return seed


def check(cfg: CVConfig) -> None:
    """UsageError naming the first unusable flag."""
    if not cfg.store or not cfg.out:
        raise UsageError(f"{'--store' if not cfg.store else '--out'}: required")
    if cfg.folds < 2:
        raise UsageError(f"--folds {cfg.folds}: need at least 2 folds")
    if cfg.fold is not None and not 0 <= cfg.fold < cfg.folds:
        raise UsageError(f"--fold {cfg.fold}: must be in 0..{cfg.folds - 1}")
    if cfg.prepare and cfg.report:
        raise UsageError("--prepare and --report: choose one")


def train_fold(cfg: CVConfig, seed: int, fold: int, train_argv: list[str]) -> int:
    """Train (or continue) one fold's run folder; the trainer's exit status."""
    console.print(f"[bold]cross-validation: fold {fold + 1}/{cfg.folds}", highlight=False)
    # the final epoch's model: choosing the best epoch on the held-out patients would flatter the report
    argv = ["--export_model", "last", *train_argv, "--data", cfg.store, "--out", str(Path(cfg.out) / f"fold-{fold}"),
            "--loader.train_split", split_name(cfg, seed, fold, "train"),
            "--loader.val_split", split_name(cfg, seed, fold, "val"), "--resume", "auto"]
    return train_run(parse_train(argv))


# ---------------------------------------------------------------------------------------------- report

def fold_models(cfg: CVConfig, fold: int) -> list[Path]:
    """The fold's exported model in this folder, then in each ``--ensemble`` folder (ModelError when missing)."""
    dirs = [Path(d) / f"fold-{fold}" / "model" for d in (cfg.out, *cfg.ensemble)]
    for d in dirs:
        read_meta(d)                                     # one line (ModelError) when the fold has no model yet
    return dirs


def fold_rows(cfg: CVConfig, seed: int, fold: int, store: Store, models: list[Path], progress,
              task) -> list[dict[str, Any]]:
    """Dice per class of each held-out case of one fold, from ``models`` (several: their ensemble)."""
    pred = load_predictor(models, keep_largest=cfg.keep_largest, tta=cfg.tta)   # ModelError: TTA refused
    names = pred.meta.get("class_names") or [store.label_map[k] for k in sorted(store.label_map, key=int)][1:]
    rows = []
    for case in store.split_cases(split_name(cfg, seed, fold, "val")):
        image, truth = store.read_case(case)
        labels = pred.predict_volume(image, store.info(case).attrs.get("stats"))[0]
        scores = {n: dice(labels == k, truth == k) for k, n in enumerate(names, start=1)}
        rows.append({"case": case, "fold": fold, "dice": scores, "mean": float(np.mean(list(scores.values())))})
        progress.update(task, advance=1, info=case)
    return rows


def stats(values: list[float]) -> dict[str, float | int]:
    return {"mean": float(np.mean(values)), "sd": float(np.std(values)), "n": len(values)}


def summarize(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Per class (and the mean over classes): mean ± sd over the rows' cases."""
    names = list(rows[0]["dice"])
    return {**{n: stats([r["dice"][n] for r in rows]) for n in names}, "mean": stats([r["mean"] for r in rows])}


def build_report(cfg: CVConfig, seed: int) -> dict[str, Any]:
    """Score every fold on its held-out cases (this folder's models; with ``--ensemble`` also their ensembles)."""
    store = Store(cfg.store)
    total = sum(len(store.split_cases(split_name(cfg, seed, i, "val"))) for i in range(cfg.folds))
    rows: list[dict[str, Any]] = []
    ens_rows: list[dict[str, Any]] = []
    per_fold = []
    with make_progress("cases") as progress:
        task = progress.add_task("cross-validation report", total=total * (2 if cfg.ensemble else 1), info="")
        for i in range(cfg.folds):
            models = fold_models(cfg, i)
            fold = fold_rows(cfg, seed, i, store, models[:1], progress, task)
            meta = read_meta(models[0])
            per_fold.append({"fold": i, "cases": [r["case"] for r in fold], "dice": summarize(fold),
                             "model_epoch": meta.get("epoch"), "model_selected": meta.get("selected", "best"),
                             "val_dice_training_grid": meta.get("val_dice")})
            rows += fold
            if cfg.ensemble:
                ens_rows += fold_rows(cfg, seed, i, store, models, progress, task)
    tta = tta_text(read_meta(fold_models(cfg, 0)[0])) if cfg.tta else None
    doc = {"store": str(cfg.store), "folds": cfg.folds, "seed": seed, "keep_largest": cfg.keep_largest, "tta": tta,
           "classes": list(rows[0]["dice"]),
           "pooled": summarize(rows), "per_fold": per_fold, "per_case": rows}
    if cfg.ensemble:
        doc["ensemble"] = {"members": 1 + len(cfg.ensemble), "pooled": summarize(ens_rows), "per_case": ens_rows}
    return doc


def markdown(doc: dict[str, Any]) -> str:
    """The report as Markdown: pooled Dice per class, per fold, per case."""
    cols = [*doc["classes"], "mean"]
    head = "| | " + " | ".join(cols) + " |\n|---|" + "---:|" * len(cols) + "\n"
    pm = " | ".join(f"{doc['pooled'][c]['mean']:.4f} ± {doc['pooled'][c]['sd']:.4f}" for c in cols)
    selected = {f.get("model_selected", "best") for f in doc["per_fold"]}
    lines = [f"# Cross-validated Dice ({doc['folds']} folds drawn with seed {doc['seed']}, {len(doc['per_case'])} cases)\n",
             "Each fold's model on its own held-out patients, original geometry"
             + (", largest connected component per class" if doc.get("keep_largest") else "")
             + (f", test-time augmentation ({doc['tta']})" if doc.get("tta") else "") + "; "
             + ("the final epoch's model" if selected == {"last"} else "the epoch with the best Dice on those "
                "held-out patients (an optimistic choice; train with --export_model last)") + ".\n", head + f"| pooled | {pm} |"]
    for f in doc["per_fold"]:
        lines.append(f"| fold {f['fold']} | " + " | ".join(f"{f['dice'][c]['mean']:.4f}" for c in cols) + " |")
    if "ensemble" in doc:
        ens = doc["ensemble"]["pooled"]
        lines.append(f"| ensemble of {doc['ensemble']['members']}, pooled | "
                     + " | ".join(f"{ens[c]['mean']:.4f} ± {ens[c]['sd']:.4f}" for c in cols) + " |")
    lines.append("\n## Per case\n\n| case | fold | " + " | ".join(cols) + " |\n|---|---:|" + "---:|" * len(cols))
    for r in doc["per_case"]:
        values = [*(r["dice"][c] for c in doc["classes"]), r["mean"]]
        lines.append(f"| {r['case']} | {r['fold']} | " + " | ".join(f"{v:.4f}" for v in values) + " |")
    return "\n".join(lines) + "\n"


def write_report(cfg: CVConfig, seed: int) -> dict[str, Any]:
    """Build, write (JSON + Markdown, atomically) and print the report."""
    doc = build_report(cfg, seed)
    out = Path(cfg.out)
    name = report_name(cfg)
    atomic_write(out / f"{name}.json", json.dumps(doc, indent=2) + "\n")
    atomic_write(out / f"{name}.md", markdown(doc))
    table = Table(title=f"cross-validated Dice, {cfg.folds} folds, {len(doc['per_case'])} held-out cases")
    table.add_column("")
    for c in [*doc["classes"], "mean"]:
        table.add_column(c, justify="right")
    table.add_row("pooled", *(f"{doc['pooled'][c]['mean']:.4f} ± {doc['pooled'][c]['sd']:.4f}"
                              for c in [*doc["classes"], "mean"]))
    for f in doc["per_fold"]:
        table.add_row(f"fold {f['fold']}", *(f"{f['dice'][c]['mean']:.4f}" for c in [*doc["classes"], "mean"]))
    if "ensemble" in doc:
        ens = doc["ensemble"]["pooled"]
        table.add_row(f"ensemble of {doc['ensemble']['members']}",
                      *(f"{ens[c]['mean']:.4f} ± {ens[c]['sd']:.4f}" for c in [*doc["classes"], "mean"]))
    console.print(table)
    console.print(f"report: {out / name}.json, .md; ensemble of the folds: dlseg/predict.py "
                  + " ".join(f"--model {out / f'fold-{i}'}" for i in range(cfg.folds)), highlight=False)
    return doc


def run(cfg: CVConfig, train_argv: list[str]) -> int:
    """Record the folds, train them (all, or ``--fold``), then report; the exit status."""
    check(cfg)
    seed = record_folds(cfg)
    if cfg.prepare:
        console.print(f"{cfg.folds} folds recorded in {cfg.store}; next: STORE={cfg.store} CV_OUT={cfg.out} "
                      f"FOLDS={cfg.folds} sbatch --array=0-{cfg.folds - 1} launch/train_cv.sbatch [train flags], "
                      "then this command with --report", highlight=False)
        return 0
    if not cfg.report:
        for i in [cfg.fold] if cfg.fold is not None else range(cfg.folds):
            code = train_fold(cfg, seed, i, train_argv)
            if code != 0:
                return code
        if cfg.fold is not None:
            return 0
    write_report(cfg, seed)
    return 0


def main(argv: list[str] | None = None) -> int:
    """Entry point: the CV flags here, every other flag to the trainer."""
    def go() -> int:
        parser = build_parser(CVConfig, prog="python -m dlseg.cv", description="K-fold cross-validation over a "
                              "store's labeled patients and its per-organ report; other flags go to dlseg/train.py.")
        ns, rest = parser.parse_known_args(list(sys.argv[1:] if argv is None else argv))
        return run(config_from_namespace(CVConfig, ns), rest)
    return run_entry(go)


if __name__ == "__main__":
    sys.exit(main())

"""Training parts alone: --help per key, validation counts and their reduction, optimizer, schedule, preemption."""

from __future__ import annotations

import argparse
import json
import os
import signal

import pytest
import torch

from dlseg.config import build_parser, to_dict
from dlseg.optim import OptimConfig, SchedConfig, build_optimizer, build_scheduler
from dlseg.preemption import PREEMPTED_MARKER, PreemptFlag, clear_marker, write_marker
from dlseg.train_config import TrainConfig
from dlseg.validation import ValidationCounts, evaluate


def test_help_documents_every_key():
    parser = build_parser(TrainConfig, prog="dlseg/train.py", description="")
    helps = {a.dest: a.help for a in parser._actions if a.option_strings and a.help != argparse.SUPPRESS}

    def leaves(d: dict, prefix: str = "") -> list[str]:
        return [k for key, v in d.items()
                for k in (leaves(v, f"{prefix}{key}.") if isinstance(v, dict) else [f"{prefix}{key}"])]

    keys = leaves(to_dict(TrainConfig()))
    assert "optim.lr" in keys and "loader.ct_window" in keys and "augment.hflip" in keys
    undocumented = [k for k in keys if not (helps.get(k) or "").split("(default")[0].strip()]
    assert undocumented == []


def binary_logits(pred: list) -> torch.Tensor:
    """(N, 1, H, W) logits whose sigmoid exceeds 0.5 exactly where ``pred`` (N, H, W) is 1."""
    return (torch.tensor(pred, dtype=torch.float32) * 10 - 5).unsqueeze(1)


# Case 0: slices A, B; case 1: slices C (empty truth and prediction), D (one false positive).
SLICES = {
    "A": (0, [[1, 1], [0, 0]], [[1, 0], [1, 0]], 0.5),     # TP 1, FP 1, FN 1
    "B": (0, [[0, 1], [1, 0]], [[0, 1], [1, 1]], 0.5),     # TP 2, FP 0, FN 1
    "C": (1, [[0, 0], [0, 0]], [[0, 0], [0, 0]], 0.5),
    "D": (1, [[1, 0], [0, 0]], [[0, 0], [0, 0]], 2.0),     # FP 1
}


def add_slices(counts: ValidationCounts, names: str) -> ValidationCounts:
    """Update ``counts`` with one batch of the named slices (the batch's loss: the mean of theirs)."""
    rows = [SLICES[n] for n in names]
    counts.update(torch.tensor([r[0] for r in rows]), binary_logits([r[1] for r in rows]),
                  torch.tensor([r[2] for r in rows]), loss=sum(r[3] for r in rows) / len(rows))
    return counts


def test_validation_counts_sum_per_case_before_dice():
    counts = add_slices(add_slices(ValidationCounts(2, 1), "ABC"), "D")
    assert counts.slices.tolist() == [2, 2]
    assert counts.confusion.tolist() == [[[3, 1, 2]], [[0, 1, 0]]]
    scores = counts.compute()
    assert scores.dice == [pytest.approx(2 / 3), 0.0]          # not the per-slice means 0.65 and 0.5
    assert scores.loss == pytest.approx((0.5 * 3 + 2.0) / 4)   # per slice, not per batch
    counts.check_complete([2, 2])
    with pytest.raises(RuntimeError, match=r"saw \[2, 2\] slices per case, expected \[2, 3\]"):
        counts.check_complete([2, 3])


def test_validation_counts_multiclass_mean_over_foreground_classes():
    pred = torch.tensor([[[0, 1, 2]], [[1, 1, 1]]])
    logits = torch.nn.functional.one_hot(pred, 3).permute(0, 3, 1, 2).float()
    counts = ValidationCounts(2, 3)
    counts.update(torch.tensor([0, 1]), logits, torch.tensor([[[1, 1, 2]], [[1, 0, 0]]]))
    assert counts.confusion.tolist() == [[[1, 0, 1], [1, 0, 0]], [[1, 2, 0], [0, 0, 0]]]
    scores = counts.compute()
    assert scores.dice == [pytest.approx((2 / 3 + 1) / 2), pytest.approx((0.5 + 1) / 2)]  # class 2 absent: 1.0
    assert scores.class_dice == [[pytest.approx(2 / 3), 1.0], [pytest.approx(0.5), 1.0]]
    assert scores.class_means() == [pytest.approx((2 / 3 + 0.5) / 2), 1.0]
    assert sum(scores.class_means()) / 2 == pytest.approx(sum(scores.dice) / 2)   # best-model criterion either way


class TwoRanks:
    """Stands in for rank 0's Accelerator of 2 processes: ``reduce`` adds rank 1's tensor of the same field."""

    def __init__(self, this: ValidationCounts, other: ValidationCounts):
        self.this, self.other = this, other

    def reduce(self, tensor: torch.Tensor, reduction: str) -> torch.Tensor:
        assert reduction == "sum"
        (name,) = [k for k, v in vars(self.this).items() if v is tensor]
        return tensor + getattr(self.other, name)


def test_validation_counts_reduce_from_all_processes_equals_one_process():
    rank0 = add_slices(add_slices(ValidationCounts(2, 1), "A"), "D")
    rank1 = add_slices(ValidationCounts(2, 1), "BC")
    with pytest.raises(RuntimeError, match="validation saw"):
        rank0.check_complete([2, 2])                            # this process's share only
    rank0.reduce_from_all_processes(TwoRanks(rank0, rank1))
    rank0.check_complete([2, 2])
    one = add_slices(ValidationCounts(2, 1), "ABCD")
    assert rank0.confusion.tolist() == one.confusion.tolist() == [[[3, 1, 2]], [[0, 1, 0]]]
    assert rank0.compute() == one.compute()
    assert rank0.compute().loss == pytest.approx((0.5 * 3 + 2.0) / 4)


def test_evaluate_counts_every_batch_and_restores_training_mode():
    model = torch.nn.Conv2d(1, 1, 1)
    with torch.no_grad():
        model.weight.fill_(1.0)
        model.bias.fill_(-0.5)                                  # logit > 0 where the image is 1
    images = torch.tensor([[[1.0, 0.0], [0.0, 0.0]], [[1.0, 1.0], [0.0, 0.0]], [[0.0, 0.0], [0.0, 0.0]]])
    masks = torch.tensor([[[1, 1], [0, 0]], [[1, 1], [0, 0]], [[0, 0], [0, 1]]])
    loader = [{"image": images[:2, None], "mask": masks[:2], "case": torch.tensor([0, 0])},
              {"image": images[2:, None], "mask": masks[2:], "case": torch.tensor([1])}]
    model.train()
    counts = evaluate(model, loader, ValidationCounts(2, 1), loss_fn=lambda logits, mask: torch.tensor(1.0))
    assert model.training
    assert counts.slices.tolist() == [2, 1]
    assert counts.confusion.tolist() == [[[3, 0, 1]], [[0, 0, 1]]]
    assert counts.compute() == ([pytest.approx(6 / 7), 0.0], 1.0, [[pytest.approx(6 / 7)], [0.0]])


def test_build_optimizer_adam_couples_weight_decay_adamw_decouples_it():
    for name, after in (("adam", 0.5), ("adamw", 0.95)):
        param = torch.nn.Parameter(torch.ones(3))
        opt = build_optimizer(OptimConfig(name=name, lr=0.5, weight_decay=0.1), [param])
        assert type(opt) is {"adam": torch.optim.Adam, "adamw": torch.optim.AdamW}[name]
        assert (opt.param_groups[0]["lr"], opt.param_groups[0]["weight_decay"]) == (0.5, 0.1)
        param.grad = torch.zeros(3)
        opt.step()          # adam: the decay is the gradient, normalized to a step of lr; adamw: p *= 1 - lr * wd
        assert param.detach().tolist() == pytest.approx([after] * 3)


@pytest.mark.parametrize("sched, lrs", [
    (SchedConfig(name="step", step_size=2, gamma=0.5), [1.0, 1.0, 0.5, 0.5, 0.25]),
    (SchedConfig(name="step", step_size=2, gamma=0.5, warmup_epochs=1), [0.5, 1.0, 1.0, 0.5, 0.5]),
    (SchedConfig(name="poly", power=1.0, min_lr_ratio=0.2), [1.0, 0.84, 0.68, 0.52, 0.36]),
    (SchedConfig(name="cosine"), [1.0, 0.904508, 0.654508, 0.345492, 0.095492]),
])
def test_build_scheduler_learning_rate_per_epoch(sched, lrs):
    opt = build_optimizer(OptimConfig(lr=1.0), [torch.nn.Parameter(torch.ones(1))])
    scheduler = build_scheduler(sched, opt, epochs=5)
    assert isinstance(scheduler, torch.optim.lr_scheduler.StepLR) == (sched.name == "step" and not sched.warmup_epochs)
    got = []
    for _ in range(5):
        got.append(opt.param_groups[0]["lr"])
        opt.step()
        scheduler.step()
    assert got == pytest.approx(lrs, abs=1e-6)


def test_preempt_flag_catches_sigusr1_and_restores_the_handler(tmp_path):
    before = signal.getsignal(signal.SIGUSR1)
    flag = PreemptFlag().install()
    try:
        assert not flag.requested
        os.kill(os.getpid(), signal.SIGUSR1)
        assert flag.requested and flag.signal == "SIGUSR1"
    finally:
        flag.uninstall()
    assert signal.getsignal(signal.SIGUSR1) is before
    write_marker(tmp_path, "step_0000042")
    assert json.loads((tmp_path / PREEMPTED_MARKER).read_text()) == {"checkpoint": "step_0000042", "exit": 75}
    clear_marker(tmp_path)
    assert not (tmp_path / PREEMPTED_MARKER).exists()

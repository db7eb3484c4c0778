"""The config → command-line mechanism every entry point uses, and the atomic file helpers."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import pytest

from dlseg.augment import invariances
from dlseg.config import option, parse_args
from dlseg.console import run_entry
from dlseg.errors import ConfigError, UserError
from dlseg.fileio import atomic_save, atomic_write, install_dir
from dlseg.train import parse as parse_train
from dlseg.train_config import check_config as check_train


@dataclass
class Section:
    lr: float = option("learning rate", 1e-3)


@dataclass
class Cmd:
    src: str = option("input folder", positional=True, flag="SRC")
    formats: tuple[str, ...] = option("comma list", ("png",), flag="--format")
    batch_size: int = option("slices per batch", 8)
    mode: str = option("how", "fast", choices=("fast", "exact"))
    val_fraction: float = option("val share", 0.2, exclusive="split")
    folds: int | None = option("k folds", None, exclusive="split")
    qa: bool = option("pictures", False)


@dataclass
class Train:
    epochs: int = option("epochs", 3)
    amp: bool = option("autocast", True)
    optim: Section = field(default_factory=Section)


def parse(argv, cls=Cmd):
    return parse_args(cls, argv, prog="cmd", description="test")


def test_flags_come_from_the_fields_with_their_types():
    cfg = parse(["in", "--format", "png,npz", "--batch-size", "16", "--mode", "exact", "--folds", "4", "--qa"])
    assert cfg == Cmd(src="in", formats=("png", "npz"), batch_size=16, mode="exact", folds=4, qa=True)
    assert parse(["in"]) == Cmd(src="in")                     # defaults where no flag is given
    assert parse(["in", "--batch_size", "4"]).batch_size == 4  # the underscore spelling is the same key


def test_sections_and_bool_values():
    cfg = parse(["--optim.lr", "0.5", "--amp", "false", "--epochs=7"], Train)
    assert (cfg.optim.lr, cfg.amp, cfg.epochs) == (0.5, False, 7)
    assert parse(["--amp"], Train).amp is True


@pytest.mark.parametrize("argv, words", [
    (["in", "--batch-size", "two"], "batch_size"),                     # wrong type names the key
    (["in", "--mode", "slow"], "--mode"),                              # not one of the choices
    (["in", "--val-fraction", "0.1", "--folds", "3"], "not allowed"),  # mutually exclusive
    (["in", "--batch", "3"], "unrecognized"),                          # no abbreviations
    ([], "SRC"),                                                       # positional missing
])
def test_unusable_flags_are_config_errors(argv, words):
    with pytest.raises(ConfigError, match=words):
        parse(argv)


def test_run_entry_prints_one_line_and_returns_the_status(capsys):
    def body() -> int:
        raise ConfigError("--x: bad\nsecond line of detail")

    assert run_entry(body) == 2
    assert run_entry(lambda: 0) == 0
    err = capsys.readouterr().err
    assert "--x: bad" in err and "Traceback" not in err
    assert issubclass(ConfigError, UserError)


def test_atomic_write_replaces_whole_and_leaves_no_temporary(tmp_path):
    target = tmp_path / "sub" / "a.json"
    atomic_write(target, "one")
    atomic_write(target, b"two")
    assert target.read_text() == "two" and sorted(p.name for p in target.parent.iterdir()) == ["a.json"]

    def broken(tmp):
        tmp.write_text("half")
        raise OSError("disk full")

    with pytest.raises(OSError):
        atomic_save(target, broken)
    assert target.read_text() == "two" and sorted(p.name for p in target.parent.iterdir()) == ["a.json"]


def test_install_dir_swaps_in_the_new_version(tmp_path):
    final, new, aside = tmp_path / "case", tmp_path / ".tmp-case", tmp_path / ".old-case"
    final.mkdir()
    (final / "v").write_text("1")
    new.mkdir()
    (new / "v").write_text("2")
    install_dir(new, final, aside)
    assert (final / "v").read_text() == "2" and not new.exists() and not aside.exists()


@pytest.mark.parametrize("recipe", sorted(p.stem for p in (Path(__file__).parents[1] / "dlseg" / "recipes").glob("*.yaml")))
def test_every_shipped_recipe_resolves_and_passes_the_checks(recipe):
    cfg = parse_train(["--config", recipe, "--out", "runs/x"])
    check_train(cfg)
    assert cfg.epochs > 0 and cfg.loader.size % (2 ** cfg.model.depth) == 0
    if recipe.startswith("chaos_t2"):       # left/right organs: no mirror-like augmentation; TTA turns and zooms only
        assert invariances(cfg.augment) == ["rotate", "scale"]

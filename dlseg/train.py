"""Train a segmentation model: ``[accelerate launch] dlseg/train.py [--config RECIPE] [--key value ...]``.

    python dlseg/train.py --config demo --out runs/demo                  # synthetic cohort, CPU, minutes
    accelerate launch dlseg/train.py --config chaos_t1in --data data/chaos_t1in.zarr --out runs/t1in
    accelerate launch dlseg/train.py ... --resume auto                   # what a requeued job runs

``--config`` takes a YAML file or the name of a shipped recipe (``dlseg/recipes/NAME.yaml``). Every field of
``TrainConfig`` can be overridden as ``--key value`` (dotted for sections: ``--optim.lr 3e-4``); the resolved
config is saved as ``<out>/config.yaml``. Exit status: 0 done, 2 unusable arguments/config, 75 preempted
(state saved; run again with ``--resume auto``), 1 training failed.
"""

from __future__ import annotations

import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dlseg.config import ConfigError, resolve  # noqa: E402
from dlseg.console import fail  # noqa: E402

RECIPES = Path(__file__).resolve().parent / "recipes"


def recipe_path(name: str) -> Path:
    """A YAML path, or the shipped recipe of that name."""
    p = Path(name)
    if p.suffix in (".yaml", ".yml") or p.exists():
        if not p.is_file():
            raise ConfigError(f"config: {p}: no such recipe file")
        return p
    shipped = RECIPES / f"{name}.yaml"
    if not shipped.is_file():
        known = ", ".join(sorted(q.stem for q in RECIPES.glob("*.yaml")))
        raise ConfigError(f"config: {name!r} is neither a YAML file nor a shipped recipe (shipped: {known})")
    return shipped


def split_config_arg(argv: list[str]) -> tuple[str | None, list[str]]:
    """Take ``--config X`` / ``--config=X`` out of the arguments; the rest are ``--key value`` overrides."""
    rest, recipe, i = [], None, 0
    while i < len(argv):
        tok = argv[i]
        if tok == "--config":
            if i + 1 >= len(argv):
                raise ConfigError("config: expected a recipe name or YAML file after --config")
            recipe, i = argv[i + 1], i + 2
        elif tok.startswith("--config="):
            recipe, i = tok.split("=", 1)[1], i + 1
        else:
            rest.append(tok)
            i += 1
    return recipe, rest


def parse(argv: list[str]):
    """Command line → TrainConfig (defaults → recipe → overrides); ConfigError naming the key."""
    from dlseg.trainer import TrainConfig

    recipe, overrides = split_config_arg(argv)
    return resolve(TrainConfig, recipe_path(recipe) if recipe else None, overrides)


def main(argv: list[str] | None = None) -> int:
    """Entry point: exit status 0 / 1 / 2 / 75 (see the module docstring)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in ("-h", "--help"):
        print(__doc__)
        return 0
    try:
        cfg = parse(argv)
    except ConfigError as e:
        fail(str(e), 2)
    from dlseg import trainer
    from dlseg.checkpoint import ResumeError
    from dlseg.export import ModelError
    from dlseg.store import StoreError

    try:
        return trainer.run(cfg)
    except (ConfigError, StoreError, ResumeError, ModelError) as e:
        fail(str(e), 2)
    except trainer.TrainingError as e:
        fail(str(e), trainer.EXIT_FAILED)


if __name__ == "__main__":
    sys.exit(main())

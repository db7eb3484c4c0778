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

from dlseg.config import build_parser, config_from_namespace, resolve  # noqa: E402
from dlseg.console import run_entry  # noqa: E402
from dlseg.errors import ConfigError  # noqa: E402
from dlseg.train_config import TrainConfig  # noqa: E402
from dlseg.trainer import run  # noqa: E402

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


def parse(argv: list[str]) -> TrainConfig:
    """Command line → TrainConfig (defaults → recipe → ``--key value``); ConfigError naming the key."""
    parser = build_parser(TrainConfig, prog="dlseg/train.py", description=__doc__.splitlines()[0])
    parser.add_argument("--config", help="a YAML recipe, or the name of a shipped one (dlseg/recipes/NAME.yaml)")
    ns = parser.parse_args(argv)
    recipe = vars(ns).pop("config", None)
    return config_from_namespace(TrainConfig, ns, resolve(TrainConfig, recipe_path(recipe) if recipe else None))


def main(argv: list[str] | None = None) -> int:
    """Entry point: exit status 0 / 1 / 2 / 75 (see the module docstring)."""
    return run_entry(lambda: run(parse(list(sys.argv[1:] if argv is None else argv))))


if __name__ == "__main__":
    sys.exit(main())

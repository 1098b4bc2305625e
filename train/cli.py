"""`python -m train` / `bentolora-train`: train an adapter from a YAML recipe plus overrides.

python -m train --config configs/quickstart.yaml --rank 8 --max-steps 200
python -m train sample-data data/sample
python -m train evaluate --adapter lora-quickstart --prompts prompts.txt --promote
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import sys
from collections.abc import Sequence

from train.config import ConfigError, TrainConfig, field_docs, from_dict, load_yaml

USER_ERRORS: tuple[type[BaseException], ...] = (ValueError, LookupError, RuntimeError, OSError)
"""Errors that carry a message for the user (bad config, data, base, checkpoint, NaN loss)."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m train",
        description="Train a LoRA adapter for an SDXL base in the BentoML model store. Options "
        "override the --config YAML file; lists are comma-separated. Also: "
        "`python -m train sample-data DIR` writes a small sample dataset; "
        "`python -m train evaluate --help` scores and gates an adapter.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--config", help="YAML recipe (see configs/)")
    docs = field_docs()
    for f in dataclasses.fields(TrainConfig):
        flag = "--" + f.name.replace("_", "-")
        default = f.default
        help_text = docs.get(f.name, "")
        if f.type == "bool":
            parser.add_argument(
                flag,
                dest=f.name,
                action=argparse.BooleanOptionalAction,
                default=argparse.SUPPRESS,
                help=f"{help_text} (default: {default})",
            )
            continue
        kind = {"int": int, "float": float}.get(f.type, str)
        shown = ",".join(default) if isinstance(default, tuple) else default
        parser.add_argument(
            flag,
            dest=f.name,
            type=kind,
            default=argparse.SUPPRESS,
            metavar=f.type.upper().split("[")[0],
            help=f"{help_text} (default: {shown!r})",
        )
    return parser


def config_from_args(argv: Sequence[str]) -> TrainConfig:
    """YAML values, then command-line values on top, checked together."""
    args = vars(build_parser().parse_args(argv))
    path = args.pop("config", None)
    values = load_yaml(path) if path else {}
    values.update(args)
    return from_dict(values, source=path or "command line")


def sample_data_main(argv: Sequence[str]) -> int:
    from train.sample_data import write_sample_dataset

    parser = argparse.ArgumentParser(
        prog="python -m train sample-data", description="Write the generated sample dataset."
    )
    parser.add_argument("dir")
    parser.add_argument("--count", type=int, default=8)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--layout", choices=("captions", "jsonl", "csv"), default="captions")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    path = write_sample_dataset(
        args.dir, count=args.count, size=args.size, layout=args.layout, seed=args.seed
    )
    print(f"sample dataset: {path}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    for noisy in ("httpx", "urllib3", "bentoml", "diffusers", "transformers"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    if argv[:1] == ["sample-data"]:
        return sample_data_main(argv[1:])
    if argv[:1] == ["evaluate"]:
        from train.evaluate_cli import evaluate_main

        return evaluate_main(argv[1:])
    try:
        config = config_from_args(argv)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    from train.loop import train

    try:
        result = train(config)
    except USER_ERRORS as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    if result.tag:
        print(
            f"steps {result.steps}  final loss {result.final_loss:.4f}  "
            f"fixed-noise loss {result.validation['fixed_noise_loss_base']:.4f} -> "
            f"{result.validation['fixed_noise_loss']:.4f}  wall {result.wall_time_s:.1f}s"
        )
        print(f"adapter: {result.tag}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""`python -m train` / `bentolora-train`: train an adapter from a YAML recipe plus overrides.

python -m train --config configs/quickstart.yaml --rank 8 --max-steps 200
python -m train sample-data data/sample
python -m train evaluate --adapter lora-quickstart --prompts prompts.txt --promote
python -m train selftest --config configs/medical-128-phase-i.yaml
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING

from train.config import (
    GATES,
    VALIDATION_SEED,
    ConfigError,
    TrainConfig,
    field_docs,
    from_dict,
    load_yaml,
)

if TYPE_CHECKING:
    from train.evaluate import Evaluation

USER_ERRORS: tuple[type[BaseException], ...] = (ValueError, LookupError, RuntimeError, OSError)
"""Errors that carry a message for the user (bad config, data, base, checkpoint, NaN loss)."""


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    for noisy in ("httpx", "urllib3", "bentoml", "diffusers", "transformers"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    if argv[:1] == ["sample-data"]:
        return sample_data_main(argv[1:])
    if argv[:1] == ["evaluate"]:
        return evaluate_main(argv[1:])
    if argv[:1] == ["selftest"]:
        return selftest_main(argv[1:])
    return train_main(argv)


def train_main(argv: Sequence[str]) -> int:
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


# --- python -m train: train an adapter


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m train",
        description="Train a LoRA adapter for an SDXL base in the BentoML model store. Options "
        "override the --config YAML file; lists are comma-separated. Also: "
        "`python -m train sample-data DIR` writes a small sample dataset; "
        "`python -m train evaluate --help` scores and gates an adapter; "
        "`python -m train selftest --help` checks machine, data and store against a recipe.",
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
    return config_from_values(vars(build_parser().parse_args(argv)))


def config_from_values(args: dict) -> TrainConfig:
    """The config from parsed options: `config` (a YAML path) and any field values on top."""
    path = args.pop("config", None)
    values = load_yaml(path) if path else {}
    values.update(args)
    return from_dict(values, source=path or "command line")


# --- python -m train selftest


def selftest_main(argv: Sequence[str]) -> int:
    import os

    from train.selftest import failed, run_selftest, table

    parser = build_parser()
    parser.prog = "python -m train selftest"
    parser.description = (
        "Check a recipe before a long run: GPUs and memory, library versions, the dataset "
        "(counts per folder, unreadable or truncated images, missing captions, small images, "
        "duplicates, held-out images), the model store, free disk, then two training steps and "
        "one render at the recipe's resolution. Prints a table with the fix for each failure; "
        "exits 1 if any check fails. Takes the training options (--config and overrides)."
    )
    parser.add_argument(
        "--gpus",
        type=int,
        default=None,
        help="GPUs the run will use (accelerate launch --num_processes); default: those visible",
    )
    args = vars(parser.parse_args(argv))
    gpus = args.pop("gpus")
    try:
        config = config_from_values(args)
        if gpus is not None and gpus < 0:
            raise ConfigError(f"--gpus {gpus}: must be 0 or more")
        if int(os.environ.get("WORLD_SIZE", "1")) > 1:
            raise ConfigError("run selftest as one process (python -m train selftest), not under "
                              "accelerate launch; --gpus N says how many the run will use")  # fmt: skip
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    checks = run_selftest(config, gpus=gpus)
    print(table(checks))
    bad = [c.name for c in checks if c.status == "FAIL"]
    print(f"selftest: FAILED ({', '.join(bad)})" if bad else "selftest: all checks passed")
    return 1 if failed(checks) else 0


# --- python -m train sample-data


def sample_data_main(argv: Sequence[str]) -> int:
    from train.sample_data import LAYOUTS, write_sample_dataset

    parser = argparse.ArgumentParser(
        prog="python -m train sample-data", description="Write the generated sample dataset."
    )
    parser.add_argument("dir")
    parser.add_argument("--count", type=int, default=8)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--layout", choices=LAYOUTS, default="captions")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    path = write_sample_dataset(
        args.dir, count=args.count, size=args.size, layout=args.layout, seed=args.seed
    )
    print(f"sample dataset: {path}")
    return 0


# --- python -m train evaluate


def build_evaluate_parser() -> argparse.ArgumentParser:
    from models.quality import HIGHER_IS_BETTER
    from train.evaluate import DEFAULT_CLIP, DEFAULT_GUIDANCE, DEFAULT_STEPS

    parser = argparse.ArgumentParser(
        prog="python -m train evaluate",
        description="Render fixed seeds with the base, the adapter and the adapter's production "
        "version (if any), score them, write the results into the adapter version's metadata "
        "(`evaluation`) and into --out. fid_clip/kid_clip are FID/KID on CLIP image features and "
        "lpips_clip is an unlearned LPIPS on CLIP hidden states (no Inception or LPIPS weights "
        "here): compare them between runs of this tool, not with published numbers.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    arg = parser.add_argument
    arg("--adapter", required=True, help="adapter to evaluate: lora-NAME or lora-NAME:VERSION")
    arg(
        "--prompts",
        default="",
        help='.txt (a prompt a line; # comments) or .jsonl ({"prompt": ..., "image": optional '
        "reference image, relative to the file}: rows with an image give ssim and lpips_clip) "
        "(default: the captions of the adapter's held-out images, each with its image)",
    )
    arg(
        "--clip",
        default="",
        help=f"CLIP store tag for the metrics (default: the adapter's validation_clip, else "
        f"{DEFAULT_CLIP})",
    )
    arg(
        "--reference",
        default="",
        help="folder of real images: gives fid_clip and kid_clip (default: the adapter's "
        "held-out images, when it has 2 or more)",
    )
    arg("--seeds-per-prompt", type=int, default=1, help="images per prompt, each its own seed")
    arg(
        "--seed",
        type=int,
        default=VALIDATION_SEED,
        help="first seed; image j of prompt i uses seed + j × prompts + i",
    )
    arg("--size", type=int, default=0, help="image side (default: the training resolution)")
    arg(
        "--steps",
        type=int,
        default=0,
        help=f"denoising steps (default: the training validation steps, else {DEFAULT_STEPS})",
    )
    arg(
        "--guidance",
        type=float,
        default=None,
        help=f"guidance scale (default: the training validation guidance, else {DEFAULT_GUIDANCE})",
    )
    arg("--scale", type=float, default=1.0, help="LoRA scale of the adapter and production")
    arg(
        "--metric",
        choices=tuple(HIGHER_IS_BETTER),
        default="clip_score",
        help="what --promote judges by (higher is better for clip_score and ssim, lower for "
        "the others)",
    )
    arg(
        "--margin",
        type=float,
        default=0.0,
        help="--promote needs the adapter to beat its reference by more than this",
    )
    arg(
        "--promote",
        action="store_true",
        help="label the adapter stage=production if it beats the current production version "
        "(else the base) on --metric by --margin; the previous production becomes stage=archived",
    )
    for field, (metric, op) in GATES.items():
        side = "below" if op == "<" else "above"
        arg(
            "--" + field.replace("_", "-"),
            dest=field,
            type=float,
            default=None,
            metavar="X",
            help=f"--promote also needs the adapter's {metric} {side} X; 0 drops the threshold "
            "(default: the adapter's training recipe's)",
        )
    arg("--device", choices=("auto", "cpu", "cuda"), default="auto")
    arg(
        "--dtype",
        choices=("auto", "float32", "float16", "bfloat16"),
        default="auto",
        help="weights dtype (auto: bfloat16 on cuda, float32 on cpu)",
    )
    arg(
        "--out",
        default="",
        help="folder for images and results.json (default: runs/evaluate/<adapter>-<version>)",
    )
    return parser


def evaluate_main(argv: Sequence[str]) -> int:
    from train.evaluate import EvalOptions, evaluate, plan

    args = build_evaluate_parser().parse_args(argv)
    options = EvalOptions(**vars(args))
    try:
        planned = plan(options)
    except USER_ERRORS as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    if planned.held_out is not None:
        print(f"held-out images of {planned.adapter.tag}: {planned.held_out['root']}")
    print(
        f"evaluating {planned.adapter.tag} on base {planned.base.tag}"
        + (f" against production {planned.production.tag}" if planned.production else "")
        + f": {len(planned.rows)} prompts × {options.seeds_per_prompt} seeds, "
        f"{planned.size}px, {planned.steps} steps, guidance {planned.guidance:g}, "
        f"CLIP {planned.clip}, {planned.device}"
    )
    try:
        result = evaluate(planned)
    except USER_ERRORS as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    print(table(result))
    print(f"images and results: {result.results_path.parent}")
    print(f"evaluation written to the metadata of {planned.adapter.tag}")
    if result.decision is not None:
        if result.decision.promote:
            archived = ", ".join(result.archived) or "none"
            print(
                f"gate: PROMOTED {planned.adapter.tag} to stage=production (archived: {archived})"
            )
        else:
            print(f"gate: NOT PROMOTED {planned.adapter.tag}")
        print(f"gate: {result.decision.reason}")
        for line in result.decision.thresholds:
            print(f"gate: {line}")
    return 0


def table(result: Evaluation) -> str:
    """metric | base | adapter | (production) | better? (adapter vs the reference variant).
    A value with a spread is shown as mean±std (over images for CLIP score, subsets for KID)."""
    from models.quality import HIGHER_IS_BETTER
    from train.evaluate import better

    labels = [label for label in ("base", "adapter", "production") if label in result.results]
    reference = result.reference_variant
    header = ["metric", *labels, f"better than {reference}?"]
    rows = [header]
    for metric in result.plan.metrics:
        cells = [_cell(result.results[label], metric) for label in labels]
        direction = "higher" if HIGHER_IS_BETTER[metric] else "lower"
        verdict = better(
            metric, result.results["adapter"][metric], result.results[reference][metric]
        )
        rows.append([f"{metric} ({direction})", *cells, "yes" if verdict else "no"])
    widths = [max(len(row[c]) for row in rows) for c in range(len(header))]
    return "\n".join(
        "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip()
        for row in rows
    )


def _cell(values: dict, metric: str) -> str:
    std = values.get(f"{metric}_std")
    return f"{values[metric]:.4f}" + (f"±{std:.4f}" if std else "")


if __name__ == "__main__":
    raise SystemExit(main())

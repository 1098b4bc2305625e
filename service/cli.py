"""`python -m service.cli`: one-off generation and scoring against a running server.

python -m service.cli generate "a red circle" --width 1024 --height 1024 --adapter my-style=0.8 -o out.png
python -m service.cli score out.png --text "a red circle"
python -m service.cli adapters

A server that requires a token gets it from --token or, by default, from BENTOLORA_TOKEN.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import get_args

from bentoml.exceptions import BentoMLException
from PIL import Image

from service.client import Client, SchedulerName


def parse_adapter(text: str) -> tuple[str, float]:
    name, _, scale = text.partition("=")
    try:
        return name, float(scale) if scale else 1.0
    except ValueError:
        raise argparse.ArgumentTypeError(f"--adapter {text!r}: use NAME or NAME=SCALE") from None


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m service.cli", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--url", default="http://localhost:3000")
    parser.add_argument("--timeout", type=float, default=600)
    parser.add_argument(
        "--token",
        default=os.environ.get("BENTOLORA_TOKEN") or None,
        help="the server's bearer token (default: $BENTOLORA_TOKEN)",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    gen = sub.add_parser("generate")
    gen.add_argument("prompt")
    gen.add_argument(
        "-o", "--output", default="image.png", help="file name; several images get -1, -2, …"
    )
    for flag, kind in (
        ("--negative-prompt", str),
        ("--width", int),
        ("--height", int),
        ("--steps", int),
        ("--guidance", float),
        ("--seed", int),
        ("--num-images", int),
    ):
        gen.add_argument(flag, type=kind)
    gen.add_argument("--scheduler", choices=get_args(SchedulerName))
    gen.add_argument(
        "--adapter", type=parse_adapter, action="append", default=[], help="NAME[=SCALE]"
    )
    score = sub.add_parser("score")
    score.add_argument("images", nargs="+")
    score.add_argument("--text", action="append", default=[])
    sub.add_parser("adapters")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        with Client(args.url, token=args.token, timeout=args.timeout) as client:
            if args.command == "generate":
                output = Path(args.output)
                fmt = {".jpg": "jpeg", ".jpeg": "jpeg", ".webp": "webp"}.get(
                    output.suffix.lower(), "png"
                )
                images = client.generate(
                    args.prompt,
                    negative_prompt=args.negative_prompt,
                    width=args.width,
                    height=args.height,
                    steps=args.steps,
                    guidance=args.guidance,
                    seed=args.seed,
                    num_images=args.num_images,
                    scheduler=args.scheduler,
                    adapters=dict(args.adapter),
                    output_format=fmt,
                )
                for i, generated in enumerate(images):
                    path = (
                        output if len(images) == 1 else output.with_stem(f"{output.stem}-{i + 1}")
                    )
                    generated.image.save(path)
                    print(f"{path}  seed {generated.seed}  {generated.timings['pipeline_s']:.2f}s")
            elif args.command == "score":
                scores = client.score([Image.open(p) for p in args.images], args.text)
                print(
                    json.dumps(
                        {
                            "clip_scores": scores.clip_scores,
                            "image_similarity": scores.image_similarity,
                        },
                        indent=2,
                    )
                )
            else:
                print(json.dumps(client.adapters(), indent=2))
    except BentoMLException as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

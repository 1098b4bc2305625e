"""`python -m models` / `bentolora-models`: put bases into the model store and look at what is there.

    bentolora-models build-tiny                      # the tiny test base, as sdxl-tiny
    bentolora-models import stabilityai/stable-diffusion-xl-base-1.0 --name sdxl-base \\
        --vae madebyollin/sdxl-vae-fp16-fix
    bentolora-models import-lora my-style.safetensors --name my-style --base sdxl-base
    bentolora-models export-lora lora-my-style --format kohya my-style-kohya.safetensors
    bentolora-models list
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Sequence

USER_ERRORS: tuple[type[BaseException], ...] = (ValueError, LookupError, OSError)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="bentolora-models", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)

    tiny = sub.add_parser(
        "build-tiny", help="build the tiny SDXL-architecture base (tests, quickstart)"
    )
    tiny.add_argument("--name", default="sdxl-tiny")
    tiny.add_argument("--seed", type=int, default=0)

    full = sub.add_parser(
        "build-full-size", help="full-size SDXL architecture, random weights (benchmarks)"
    )
    full.add_argument("--name", default="sdxl-arch")
    full.add_argument("--dtype", default="bfloat16")

    imp = sub.add_parser(
        "import", help="import a base from a hub id, diffusers folder or .safetensors file"
    )
    imp.add_argument("source", help="hub id (org/name), folder, or single .safetensors file")
    imp.add_argument("--name", default="sdxl-base", help="store name of the base")
    imp.add_argument("--dtype", default="float16", help="float32, float16 or bfloat16")
    imp.add_argument("--vae", help="VAE to use instead (e.g. madebyollin/sdxl-vae-fp16-fix)")
    imp.add_argument("--revision", help="hub revision (branch, tag or commit)")
    imp.add_argument("--variant", help="hub weight variant, e.g. fp16")
    imp.add_argument(
        "--config",
        dest="single_file_config",
        help="for a single file: diffusers config folder or hub id",
    )

    clip = sub.add_parser(
        "build-tiny-clip", help="build the tiny random CLIP behind /score in tests"
    )
    clip.add_argument("--name", default="clip-tiny")
    clip.add_argument("--seed", type=int, default=0)

    imp_clip = sub.add_parser("import-clip", help="import a CLIP (hub id or folder) for /score")
    imp_clip.add_argument("source", help="e.g. openai/clip-vit-large-patch14, or a local folder")
    imp_clip.add_argument("--name", default="clip-l")

    imp_lora = sub.add_parser(
        "import-lora", help="store a kohya/A1111/Civitai, diffusers or PEFT LoRA file as an adapter"
    )
    imp_lora.add_argument("file", help="the LoRA .safetensors file")
    imp_lora.add_argument("--name", required=True, help="adapter name (stored as lora-<name>)")
    imp_lora.add_argument("--base", default="sdxl-base", help="store tag of the base it is for")

    exp_lora = sub.add_parser(
        "export-lora", help="write a stored adapter as a kohya (A1111, ComfyUI) or diffusers file"
    )
    exp_lora.add_argument("tag", help="adapter: name, lora-<name> or lora-<name>:<version>")
    exp_lora.add_argument("out", help="the new .safetensors file")
    exp_lora.add_argument("--format", default="kohya", choices=("kohya", "diffusers"))

    imp_cn = sub.add_parser(
        "import-controlnet",
        help="import an SDXL ControlNet (hub id, diffusers folder or .safetensors file)",
    )
    imp_cn.add_argument("source", help="e.g. diffusers/controlnet-canny-sdxl-1.0, a folder, a file")
    imp_cn.add_argument("--name", required=True, help="stored as controlnet-<name>")
    imp_cn.add_argument("--dtype", default="float16", help="float32, float16 or bfloat16")
    imp_cn.add_argument(
        "--config", dest="single_file_config", help="for a single file: its diffusers config"
    )
    tiny_cn = sub.add_parser(
        "build-tiny-controlnet", help="build the tiny ControlNet (on a tiny base's UNet) for tests"
    )
    tiny_cn.add_argument("--base", default="sdxl-tiny", help="store tag of the tiny base")
    tiny_cn.add_argument("--name", default="tiny")
    tiny_cn.add_argument("--seed", type=int, default=0)

    imp_ref = sub.add_parser(
        "import-refiner", help="import an SDXL refiner (hub id or diffusers folder)"
    )
    imp_ref.add_argument("source", help="e.g. stabilityai/stable-diffusion-xl-refiner-1.0")
    imp_ref.add_argument("--name", default="sdxl-refiner")
    imp_ref.add_argument("--dtype", default="float16", help="float32, float16 or bfloat16")
    tiny_ref = sub.add_parser(
        "build-tiny-refiner", help="build the tiny refiner (sharing a tiny base's VAE) for tests"
    )
    tiny_ref.add_argument("--base", default="sdxl-tiny", help="store tag of the tiny base")
    tiny_ref.add_argument("--name", default="sdxl-tiny-refiner")
    tiny_ref.add_argument("--seed", type=int, default=1)

    sub.add_parser("list", help="bases, adapters, ControlNets, refiners and CLIP models")
    show = sub.add_parser("show", help="metadata of one entry as JSON")
    show.add_argument("tag")
    return parser


def run_lora_files(args: argparse.Namespace) -> int:
    from models.lora_exchange import export_lora, import_lora

    if args.command == "import-lora":
        entry = import_lora(args.file, args.name, base=args.base)
        print(f"adapter: {entry.tag} ({entry.metadata['origin']['format']} file {args.file})")
    else:
        out = export_lora(args.tag, args.format, args.out)
        print(f"wrote {out} ({args.format})")
    return 0


def run_controlnets(args: argparse.Namespace) -> int:
    from models.controlnets import build_tiny_controlnet, import_controlnet, save_controlnet

    if args.command == "import-controlnet":
        entry = import_controlnet(
            args.source, args.name, dtype=args.dtype, single_file_config=args.single_file_config
        )
    else:
        from diffusers import UNet2DConditionModel

        from models.bases import get_base

        base = get_base(args.base)
        unet = UNet2DConditionModel.from_pretrained(base.path, subfolder="unet")
        entry = save_controlnet(
            build_tiny_controlnet(unet, args.seed),
            args.name,
            source=f"tiny:{base.tag}:seed={args.seed}",
            reuse_identical=True,
        )
    print(f"controlnet: {entry.tag}")
    return 0


def run(args: argparse.Namespace) -> int:
    from models.bases import import_base, save_base
    from models.store import list_entries

    if args.command in DISPATCH:
        return DISPATCH[args.command](args)
    if args.command == "build-tiny":
        from models.tiny import build_tiny_pipeline

        entry = save_base(
            build_tiny_pipeline(args.seed),
            args.name,
            source=f"tiny:seed={args.seed}",
            reuse_identical=True,
        )
        print(f"base: {entry.tag}")
    elif args.command == "build-full-size":
        from models.device import parse_dtype
        from models.full_size import build_full_size_pipeline

        pipe = build_full_size_pipeline(dtype=parse_dtype(args.dtype))
        entry = save_base(pipe, args.name, source="random:sdxl-1.0-architecture")
        print(f"base: {entry.tag}")
    elif args.command == "import":
        entry = import_base(
            args.source,
            args.name,
            dtype=args.dtype,
            vae=args.vae,
            revision=args.revision,
            variant=args.variant,
            single_file_config=args.single_file_config,
        )
        print(f"base: {entry.tag}")
    elif args.command == "build-tiny-clip":
        from models.clip import build_tiny_clip, save_clip

        entry = save_clip(
            *build_tiny_clip(args.seed),
            args.name,
            source=f"tiny:seed={args.seed}",
            reuse_identical=True,
        )
        print(f"clip: {entry.tag}")
    elif args.command == "import-clip":
        from models.clip import import_clip

        entry = import_clip(args.source, args.name)
        print(f"clip: {entry.tag}")
    elif args.command == "list":
        rows = [
            (e.tag, e.labels.get("bentolora.kind", "?"), e.labels.get("bentolora.base", ""))
            for e in list_entries()
        ]
        print(f"{'tag':48} {'kind':8} base")
        for tag, kind, base in rows:
            print(f"{tag:48} {kind:8} {base}")
    elif args.command == "show":
        from models.store import get_entry

        entry = get_entry(args.tag)
        print(
            json.dumps(
                {"tag": entry.tag, "labels": entry.labels, "metadata": entry.metadata},
                indent=2,
                default=str,
            )
        )
    return 0


def run_refiners(args: argparse.Namespace) -> int:
    from models.refiners import build_tiny_refiner, import_refiner, save_refiner

    if args.command == "import-refiner":
        entry = import_refiner(args.source, args.name, dtype=args.dtype)
    else:
        from models.bases import get_base
        from models.loading import load_pipeline

        base = get_base(args.base)
        pipe = load_pipeline(f"store:{base.tag}")
        entry = save_refiner(
            build_tiny_refiner(pipe, args.seed),
            args.name,
            source=f"tiny:{base.tag}:seed={args.seed}",
            reuse_identical=True,
        )
    print(f"refiner: {entry.tag}")
    return 0


DISPATCH = {
    "import-lora": run_lora_files,
    "export-lora": run_lora_files,
    "import-controlnet": run_controlnets,
    "build-tiny-controlnet": run_controlnets,
    "import-refiner": run_refiners,
    "build-tiny-refiner": run_refiners,
}
"""Commands run by a function of their own."""


def main(argv: Sequence[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    args = build_parser().parse_args(argv)
    try:
        return run(args)
    except USER_ERRORS as err:
        print(f"error: {err}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    raise SystemExit(main())

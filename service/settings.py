"""Service configuration from the environment (or a .env the deployment sets), checked at start."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, fields

DTYPES = ("auto", "float32", "float16", "bfloat16")
LORA_MODES = ("fused", "peft")
SCHEDULING = ("request", "step")
STEP_ENTRIES = ("async", "batchable")
MINIMUMS = {
    "encode_workers": 0,
    "batch_window_ms": 0,
    "max_batch_images": 1,
    "max_pixels": 1,
    "max_input_bytes": 1,
    "max_input_pixels": 1,
    "max_body_bytes": 1,
    "body_timeout_s": 1,
    "max_adapter_bytes": 1,
    "adapter_watch_s": 0,
    "mixed_max_rank": 0,
    "adapter_device_bytes": 1,
    "controlnets_loaded": 1,
    "adapter_host_bytes": 1,
    "max_queue": 1,
    "max_queue_work": 1,
    "max_request_items": 1,
    "max_request_images": 1,
    "request_timeout_s": 1,
}
"""The least value of each integer setting."""


@dataclass(frozen=True)
class Settings:
    base: str = "sdxl-tiny"
    """BENTOLORA_BASE: store tag of the SDXL base to serve (`bentolora-models import` put it
    there); every adapter in the store made for it is served. Set it to your imported base."""
    clip: str = "clip-tiny"
    """BENTOLORA_CLIP: store tag of the CLIP model behind /score. Set it to an imported CLIP
    (e.g. clip-l) in production."""
    refiner: str = ""
    """BENTOLORA_REFINER: store tag of an SDXL refiner (`bentolora-models import-refiner`) for
    /generate_with_refiner (the base hands off to it part-way) and /refine (image to image);
    empty: none, and those answer 400. Loaded on first use, beside the base, and kept there
    (one model, planned for like the base)."""
    controlnets_loaded: int = 2
    """BENTOLORA_CONTROLNETS_LOADED: ControlNets kept on the device at once (an SDXL ControlNet
    is ~2.5 GB in bf16); using another unloads the least recently used, which a later request
    loads from the store again. Raise it when requests alternate between more ControlNets and
    the GPU has room; a request with more ControlNets than this is refused (400)."""
    device: str = "auto"
    """BENTOLORA_DEVICE: cuda, cuda:N, cpu, or auto (cuda when present). cuda:N pins one GPU
    of several."""
    dtype: str = "auto"
    """BENTOLORA_DTYPE: float32, float16, bfloat16, or auto (bfloat16 on cuda, float32 on cpu).
    float16 on GPUs without bfloat16 (with a base imported with the fp16-fix VAE)."""
    max_batch_images: int = 8
    """BENTOLORA_MAX_BATCH_IMAGES: images in one pipeline call at most. Raise it on a large GPU
    for throughput (memory grows with it); lower it when a batch runs out of memory."""
    max_pixels: int = 2048 * 2048
    """BENTOLORA_MAX_PIXELS: width × height of a generated image at most. Lower it to bound
    the memory and time one request can take."""
    max_input_bytes: int = 8 * 2**20
    """BENTOLORA_MAX_INPUT_BYTES: size of one image sent to /score at most (413 past it)."""
    max_input_pixels: int = 4096 * 4096
    """BENTOLORA_MAX_INPUT_PIXELS: pixels of one image sent to /score at most (decompression
    bombs); lower it on a small host."""
    max_body_bytes: int = 64 * 2**20
    """BENTOLORA_MAX_BODY_BYTES: size of one request body at most (413 past it). Raise it only
    if clients send many large images to /score at once."""
    body_timeout_s: int = 60
    """BENTOLORA_BODY_TIMEOUT_S: seconds a client has to send a whole request body, counted from
    its headers; past it the request is answered 408 and its connection closed. No request is
    queued for work before its body is complete. Raise it for clients that upload large /score
    bodies over slow links."""
    max_adapter_bytes: int = 2**30
    """BENTOLORA_MAX_ADAPTER_BYTES: size of one adapter's weights file at most (refused past
    it, with the reason in GET /adapters). Raise it for very high-rank adapters."""
    adapter_watch_s: int = 10
    """BENTOLORA_ADAPTER_WATCH_S: seconds between two looks at the model store for adapter
    versions saved, deleted or denied since; a change is served (or withdrawn) without a restart
    or an admin call. A look lists the adapter folders and re-selects only when they changed.
    0 turns the watcher off (then only POST /adapters/reload and the admin routes change what is
    served). On a shared store it is how replicas converge; lower it for faster roll-outs."""
    max_queue: int = 64
    """BENTOLORA_MAX_QUEUE: requests waiting or running per endpoint (/generate, /score); more
    are refused at once with 429 and Retry-After. About what the GPU serves within your
    clients' timeout; past it, clients retry instead of waiting."""
    max_queue_work: int = 1920
    """BENTOLORA_MAX_QUEUE_WORK: work waiting or running on /generate at most, in denoising steps
    of a 1024×1024 image (an image of w×h pixels at s steps counts s × w × h / 1024²; 1920 is 64
    such images at 30 steps). A request that would pass it is refused at once with 429 and
    Retry-After; one bigger than all of it, with 400. About what the GPU computes within your
    clients' timeout: raise it on a fast GPU, lower it when queued requests time out."""
    max_request_items: int = 16
    """BENTOLORA_MAX_REQUEST_ITEMS: entries of `requests` in one /generate or /score body at
    most (400 naming it past that). Clients with more send several requests, which the server
    batches together anyway."""
    max_request_images: int = 32
    """BENTOLORA_MAX_REQUEST_IMAGES: images in one request at most: generated (num_images summed
    over its entries) for /generate, sent for /score (400 naming it past that); also the images
    one /generate batch collects from several requests (computed in pipeline calls of
    BENTOLORA_MAX_BATCH_IMAGES). Bounds how long others wait behind one request or batch."""
    batch_window_ms: int = 10
    """BENTOLORA_BATCH_WINDOW_MS: how long an idle server waits for more requests to batch with
    the first one (a batch starts sooner once it holds BENTOLORA_MAX_REQUEST_IMAGES images;
    requests that arrive while a batch runs join the next at once). A lone request's latency
    grows by this much; raise it only when many clients send at nearly the same moment."""
    request_timeout_s: int = 600
    """BENTOLORA_REQUEST_TIMEOUT_S: a request not started by then is dropped before the GPU (the
    client has been answered 504). Match it to your clients' or load balancer's timeout."""
    token: str = ""
    """BENTOLORA_TOKEN: bearer token every endpoint but health and metrics requires (none:
    open). Set it (or the file) on any server reachable by others."""
    token_file: str = ""
    """BENTOLORA_TOKEN_FILE: file holding that token: a mounted secret, kept out of the
    process environment. Set it or BENTOLORA_TOKEN, not both."""
    admin_token: str = ""
    """BENTOLORA_ADMIN_TOKEN: bearer token for changing which adapters are loaded (POST
    /adapters/reload, /upload, /unload, /deny, /allow; none: those routes are disabled). Set it
    to upload, unload or deny adapters on a running server."""
    admin_token_file: str = ""
    """BENTOLORA_ADMIN_TOKEN_FILE: file holding the admin token (a mounted secret). Set it or
    BENTOLORA_ADMIN_TOKEN, not both."""
    cors_origins: str = ""
    """BENTOLORA_CORS_ORIGINS: comma-separated origins allowed by CORS (none: CORS off). Set it
    when a web page on another origin calls the API from the browser."""
    promoted_only: bool = False
    """BENTOLORA_PROMOTED_ONLY: 1 serves, per adapter name, only the newest version labelled
    stage=production (by `python -m train evaluate --promote`); 0 serves the newest version."""
    ui: bool = True
    """BENTOLORA_UI: 1 serves the web UI at /ui (on the service's port), 0 leaves it out (an
    API-only deployment)."""
    lora_mode: str = "fused"
    """BENTOLORA_LORA_MODE: fused merges the active adapters into the base weights in place (no
    cost per step, no recompilation on a switch); peft keeps diffusers' LoRA layers beside them
    (any format diffusers reads, e.g. DoRA; slower per step)."""
    scheduling: str = "request"
    """BENTOLORA_SCHEDULING: request runs a batch's whole pipeline call before the next batch;
    step admits waiting requests into the running batch at every denoising step (each image
    with its own steps, guidance, scheduler and adapters), so a request never waits for a
    whole batch to finish. See README, "Request-level or step-level batching"."""
    step_entry: str = "async"
    """BENTOLORA_STEP_ENTRY: how /generate feeds the step scheduler (BENTOLORA_SCHEDULING=step):
    async hands each request to it as it arrives, to join the running batch at the next step;
    batchable makes /generate a BentoML batchable API whose batches (concurrent requests'
    entries, gathered while the previous batch runs: one at a time) go to it. Keep async: lower
    p95 at 60-90% load with 16 steps, no clear winner with 4 (bench/RESULTS.md), and a client
    that leaves is logged 499; batchable is there to compare. Ignored with BENTOLORA_SCHEDULING=request."""
    mixed_max_rank: int = 32
    """BENTOLORA_MIXED_MAX_RANK: a batch whose requests use different adapter sets runs as one
    pipeline call, each image with its own low-rank terms; this is the rank one set may have on
    a layer (its adapters' ranks added up) to take part. Each adapted layer keeps
    (BENTOLORA_MAX_BATCH_IMAGES + 1) × this many factor rows on the device. A set over it, or
    with LoRA on convolutions, runs as its own call. 0: every set runs as its own call."""
    adapter_device_bytes: int = 2**31
    """BENTOLORA_ADAPTER_DEVICE_BYTES: adapters' factors kept on the GPU (float32; a rank-8
    adapter on SDXL's attention is ~46 MB); least recently used leave first, to host memory."""
    adapter_host_bytes: int = 2**33
    """BENTOLORA_ADAPTER_HOST_BYTES: adapters' factors kept in host memory, to move to the GPU
    without reading the store again; least recently used leave first."""
    compile: str = "off"
    """BENTOLORA_COMPILE: off, blocks (torch.compile of each UNet block: short compile) or unet
    (the whole UNet). Needs BENTOLORA_LORA_MODE=fused; pair it with BENTOLORA_WARMUP=1."""
    cuda_graphs: bool = False
    """BENTOLORA_CUDA_GRAPHS: replay the compiled UNet as CUDA graphs (needs compile, CUDA):
    less CPU launch overhead per step, most useful at small sizes and batches."""
    channels_last: bool = False
    """BENTOLORA_CHANNELS_LAST: UNet and VAE in channels-last memory format (faster
    convolutions on recent NVIDIA GPUs; measure with `make bench`)."""
    fuse_qkv: bool = False
    """BENTOLORA_FUSE_QKV: one matmul for the q, k, v projections of each attention (needs
    BENTOLORA_LORA_MODE=fused)."""
    compile_cache: str = ""
    """BENTOLORA_COMPILE_CACHE: folder for compiled kernels (a persistent volume makes restarts
    skip compiling); empty: torch's default under /tmp."""
    fp8: str = "off"
    """BENTOLORA_FP8: the UNet's linear layers in float8 (torchao, `pip install
    'bentolora[fp8]'`): dynamic (FP8 matmuls; CUDA capability ≥ 8.9), weight (float8 storage,
    bf16 matmuls: less memory, not faster) or off. Needs BENTOLORA_LORA_MODE=fused; dynamic
    needs bfloat16 (BENTOLORA_DTYPE auto or bfloat16)."""
    encode_workers: int = 0
    """BENTOLORA_ENCODE_WORKERS: processes that encode generated images (PNG encoding holds
    Python's GIL, ~0.15 s a 1024² image, stalling the GPU's next call); 0 encodes inline."""
    warmup: bool = False
    """BENTOLORA_WARMUP: before reporting ready, run the pipeline at the base's size with 1 and
    BENTOLORA_MAX_BATCH_IMAGES images (compiles, allocates; BentoML's batcher then never learns
    from a slow first call)."""

    def __post_init__(self) -> None:
        problems = []
        if self.dtype not in DTYPES:
            problems.append(f"BENTOLORA_DTYPE={self.dtype!r} is not one of {', '.join(DTYPES)}")
        if not (self.device in ("auto", "cpu", "cuda") or self.device.startswith("cuda:")):
            problems.append(f"BENTOLORA_DEVICE={self.device!r} is not auto, cpu, cuda or cuda:N")
        for name, least in MINIMUMS.items():
            if getattr(self, name) < least:
                problems.append(
                    f"BENTOLORA_{name.upper()}={getattr(self, name)} must be at least {least}"
                )
        for name in ("token", "admin_token"):
            if getattr(self, name) and getattr(self, f"{name}_file"):
                problems.append(
                    f"BENTOLORA_{name.upper()} and BENTOLORA_{name.upper()}_FILE are both set; set one"
                )
            path = getattr(self, f"{name}_file")
            if path and not _nonempty(path):
                problems.append(
                    f"BENTOLORA_{name.upper()}_FILE={path!r} is not a readable, non-empty file"
                )
        problems.extend(self._speed_problems())
        if problems:
            raise ValueError("; ".join(problems))

    def _speed_problems(self) -> list[str]:
        problems = []
        if self.scheduling not in SCHEDULING:
            problems.append(
                f"BENTOLORA_SCHEDULING={self.scheduling!r} is not one of {', '.join(SCHEDULING)}"
            )
        if self.step_entry not in STEP_ENTRIES:
            problems.append(
                f"BENTOLORA_STEP_ENTRY={self.step_entry!r} is not one of {', '.join(STEP_ENTRIES)}"
            )
        if self.lora_mode not in LORA_MODES:
            problems.append(
                f"BENTOLORA_LORA_MODE={self.lora_mode!r} is not one of {', '.join(LORA_MODES)}"
            )
        elif self.lora_mode == "peft":
            # peft's layers change the module tree at every adapter change, and the fused
            # attention processor would bypass the LoRA on to_q/to_k/to_v.
            for name, on in (
                ("COMPILE", self.compile != "off"),
                ("FUSE_QKV", self.fuse_qkv),
                ("FP8", self.fp8 != "off"),
            ):
                if on:
                    problems.append(f"BENTOLORA_{name} needs BENTOLORA_LORA_MODE=fused")
        if self.fp8 == "dynamic" and self.dtype in ("float16", "float32"):
            problems.append(
                f"BENTOLORA_FP8=dynamic needs BENTOLORA_DTYPE=bfloat16, not {self.dtype}"
            )
        try:
            self.speed_options()
        except ValueError as err:  # its messages start with the field's name
            for problem in str(err).split("; "):
                name, rest = re.match(r"([a-z_]+)(.*)", problem).groups()
                problems.append(f"BENTOLORA_{name.upper()}{rest}")
        return problems

    def speed_options(self):
        from models.pipeline_speed import SpeedOptions

        return SpeedOptions(
            compile=self.compile,
            cuda_graphs=self.cuda_graphs,
            channels_last=self.channels_last,
            fuse_qkv=self.fuse_qkv,
            compile_cache=self.compile_cache,
            fp8=self.fp8,
        )

    @classmethod
    def from_env(cls, env: dict[str, str] | None = None) -> Settings:
        """Settings from BENTOLORA_* variables; every bad value is reported in one ValueError."""
        env = dict(os.environ if env is None else env)
        values, problems = {}, []
        for f in fields(cls):
            raw = env.get(f"BENTOLORA_{f.name.upper()}")
            if raw is not None:
                try:
                    values[f.name] = _parse(f.type, raw)
                except ValueError as err:
                    problems.append(f"BENTOLORA_{f.name.upper()}={raw!r} {err}")
        try:
            settings = cls(**values)
        except ValueError as err:
            problems.append(str(err))
        if problems:
            raise ValueError("; ".join(problems))
        return settings

    def bearer_token(self) -> str:
        """The client token, from the variable or the secret file; empty when auth is off."""
        return _read(self.token_file) if self.token_file else self.token

    def bearer_admin_token(self) -> str:
        return _read(self.admin_token_file) if self.admin_token_file else self.admin_token

    def allowed_origins(self) -> list[str]:
        return [o.strip() for o in self.cors_origins.split(",") if o.strip()]

    def torch_device(self) -> str:
        from models.device import resolve_device

        return resolve_device(self.device)

    def torch_dtype(self):
        from models.device import resolve_dtype

        return resolve_dtype(self.dtype, self.torch_device())


BOOLEANS = {"1": True, "true": True, "yes": True, "on": True}
BOOLEANS.update({"0": False, "false": False, "no": False, "off": False, "": False})


def _parse(kind: str, raw: str) -> int | bool | str:
    if kind == "int":
        try:
            return int(raw)
        except ValueError:
            raise ValueError("is not an integer") from None
    if kind == "bool":
        try:
            return BOOLEANS[raw.strip().lower()]
        except KeyError:
            raise ValueError("is not a boolean: use 1 or 0 (true/false, yes/no, on/off)") from None
    return raw


def _read(path: str) -> str:
    with open(path) as f:
        return f.read().strip()


def _nonempty(path: str) -> bool:
    try:
        return bool(_read(path))
    except OSError:
        return False

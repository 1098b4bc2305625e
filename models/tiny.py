"""The tiny SDXL-architecture pipeline: same components and wiring as SDXL, a few MB of random weights.

Tests, CI and the quickstart run on it on a CPU. Weights come from a fixed seed, so two builds are
bit-identical, and the tokenizer is byte-level (no vocabulary file to download).
"""

from __future__ import annotations

import torch
from diffusers import (
    AutoencoderKL,
    EulerDiscreteScheduler,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from transformers import (
    CLIPTextConfig,
    CLIPTextModel,
    CLIPTextModelWithProjection,
    CLIPTokenizer,
)
from transformers.convert_slow_tokenizer import bytes_to_unicode

from models.sdxl_config import SCHEDULER_CONFIG

TEXT_HIDDEN = 32
"""Hidden size of the first tiny text encoder (CLIP-L's place)."""

TEXT_HIDDEN_2 = 48
"""Hidden size of the second (OpenCLIP-bigG's place). It differs from the first, as in SDXL
(768 vs 1280): single-file loaders tell the two encoders apart by that width."""

TIME_EMBED_DIM = 8
"""Width of each of the six micro-conditioning embeddings (SDXL uses 256)."""


def byte_level_tokenizer() -> CLIPTokenizer:
    """A CLIP tokenizer with one token per byte (and per word-final byte), no merges.

    Every string tokenizes, one token a byte, so prompt length limits behave as with the real
    tokenizer, only sooner.
    """
    chars = list(bytes_to_unicode().values())
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for char in chars:
        vocab[char] = len(vocab)
    for char in chars:
        vocab[char + "</w>"] = len(vocab)
    return CLIPTokenizer(vocab=vocab, merges=[], model_max_length=77)


def _text_config(vocab_size: int, hidden: int) -> CLIPTextConfig:
    return CLIPTextConfig(
        vocab_size=vocab_size,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=77,
        projection_dim=hidden,
        hidden_act="gelu",
        bos_token_id=0,
        eos_token_id=1,
        pad_token_id=1,
    )


def build_tiny_pipeline(seed: int = 0) -> StableDiffusionXLPipeline:
    """Build the tiny SDXL pipeline in float32 on the CPU, weights drawn from `seed`."""
    torch.manual_seed(seed)
    tokenizer = byte_level_tokenizer()
    tokenizer_2 = byte_level_tokenizer()
    text_encoder = CLIPTextModel(_text_config(len(tokenizer), TEXT_HIDDEN))
    text_encoder_2 = CLIPTextModelWithProjection(_text_config(len(tokenizer_2), TEXT_HIDDEN_2))
    unet = UNet2DConditionModel(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        block_out_channels=(32, 64),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        transformer_layers_per_block=(1, 2),
        attention_head_dim=(2, 4),
        use_linear_projection=True,
        cross_attention_dim=TEXT_HIDDEN + TEXT_HIDDEN_2,
        addition_embed_type="text_time",
        addition_time_embed_dim=TIME_EMBED_DIM,
        projection_class_embeddings_input_dim=6 * TIME_EMBED_DIM + TEXT_HIDDEN_2,
        norm_num_groups=32,
    )
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        block_out_channels=(8, 16, 16, 16),
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=8,
        sample_size=64,
        scaling_factor=0.13025,
    )
    scheduler = EulerDiscreteScheduler(**SCHEDULER_CONFIG)
    return StableDiffusionXLPipeline(
        vae=vae,
        text_encoder=text_encoder,
        text_encoder_2=text_encoder_2,
        tokenizer=tokenizer,
        tokenizer_2=tokenizer_2,
        unet=unet,
        scheduler=scheduler,
    )

"""CLIP, for scoring images against texts (CLIP score) and against each other.

The model lives in the model store like the bases (`clip-tiny` for tests, `clip-l` imported from
`openai/clip-vit-large-patch14` or a folder in production) and is read with transformers.
CLIP score follows Hessel et al. 2021 as torchmetrics computes it: 100 × max(cos(image, text), 0).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from transformers import CLIPConfig, CLIPModel, CLIPTokenizer

from models.store import StoreEntry, create_entry, get_entry
from models.tiny import byte_level_tokenizer

log = logging.getLogger(__name__)

KIND = "clip"
OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)


def build_tiny_clip(seed: int = 0) -> tuple[CLIPModel, CLIPTokenizer]:
    """A CLIP of the real architecture, a few hundred kB, random weights from `seed`."""
    torch.manual_seed(seed)
    tokenizer = byte_level_tokenizer()
    config = CLIPConfig(
        text_config={
            "vocab_size": len(tokenizer),
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "max_position_embeddings": 77,
            "bos_token_id": 0,
            "eos_token_id": 1,
            "pad_token_id": 1,
        },
        vision_config={
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "image_size": 32,
            "patch_size": 8,
        },
        projection_dim=32,
    )
    return CLIPModel(config).eval(), tokenizer


def save_clip(
    model: CLIPModel,
    tokenizer: CLIPTokenizer,
    name: str,
    *,
    source: str,
    reuse_identical: bool = False,
) -> StoreEntry:
    with create_entry(
        name, kind=KIND, metadata={"source": source}, reuse_identical=reuse_identical
    ) as staged:
        model.save_pretrained(staged.path)
        tokenizer.save_pretrained(staged.path)
        staged.metadata["image_size"] = model.config.vision_config.image_size
    return get_entry(staged.tag, kind=KIND)


def import_clip(source: str, name: str) -> StoreEntry:
    """Import a CLIP from a hub id or a local folder (needs the weights to be reachable)."""
    model = CLIPModel.from_pretrained(source)
    tokenizer = CLIPTokenizer.from_pretrained(source)
    return save_clip(model, tokenizer, name, source=source)


class ClipScorer:
    """CLIP embeddings of images and texts, and the scores built from them."""

    def __init__(
        self, model: CLIPModel, tokenizer: CLIPTokenizer, device: str | torch.device = "cpu"
    ):
        self.model = model.to(device).eval()
        self.tokenizer = tokenizer
        self.device = torch.device(device)
        self.image_size = model.config.vision_config.image_size

    @classmethod
    def from_store(cls, tag: str, device: str | torch.device = "cpu") -> ClipScorer:
        path = Path(get_entry(tag, kind=KIND).path)
        return cls(CLIPModel.from_pretrained(path), CLIPTokenizer.from_pretrained(path), device)

    def preprocess(self, images: Sequence[Image.Image]) -> torch.Tensor:
        """OpenAI CLIP's preprocessing: bicubic resize of the short side, center crop, normalise."""
        size = self.image_size
        arrays = []
        for image in images:
            image = image.convert("RGB")
            scale = size / min(image.size)
            w, h = max(size, round(image.width * scale)), max(size, round(image.height * scale))
            image = image.resize((w, h), Image.Resampling.BICUBIC)
            left, top = (w - size) // 2, (h - size) // 2
            image = image.crop((left, top, left + size, top + size))
            arrays.append((np.asarray(image, dtype=np.float32) / 255.0 - OPENAI_MEAN) / OPENAI_STD)
        return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).float()

    @torch.no_grad()
    def image_embeddings(self, images: Sequence[Image.Image]) -> torch.Tensor:
        pixels = self.preprocess(images).to(self.device, self.model.dtype)
        pooled = self.model.vision_model(pixel_values=pixels).pooler_output
        return torch.nn.functional.normalize(self.model.visual_projection(pooled).float(), dim=-1)

    @torch.no_grad()
    def text_embeddings(self, texts: Sequence[str]) -> torch.Tensor:
        tokens = self.tokenizer(
            list(texts),
            padding="max_length",
            truncation=True,
            max_length=self.tokenizer.model_max_length,
            return_tensors="pt",
        )
        out = self.model.text_model(
            input_ids=tokens.input_ids.to(self.device),
            attention_mask=tokens.attention_mask.to(self.device),
        )
        return torch.nn.functional.normalize(
            self.model.text_projection(out.pooler_output).float(), dim=-1
        )

    def clip_scores(self, images: Sequence[Image.Image], texts: Sequence[str]) -> torch.Tensor:
        """(images × texts) CLIP scores: 100 × max(cosine, 0)."""
        cosine = self.image_embeddings(images) @ self.text_embeddings(texts).T
        return 100.0 * cosine.clamp(min=0)

    def image_similarity(self, images: Sequence[Image.Image]) -> torch.Tensor:
        """(images × images) cosine similarity of CLIP image embeddings."""
        embeddings = self.image_embeddings(images)
        return embeddings @ embeddings.T

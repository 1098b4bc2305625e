"""Independent references for the quality metrics: torchmetrics fed with the same tiny CLIP."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from transformers import CLIPImageProcessor, CLIPModel, CLIPProcessor, CLIPTokenizer

from models.clip import OPENAI_MEAN, OPENAI_STD


def save_clip_folder(model: CLIPModel, tokenizer: CLIPTokenizer, folder: Path) -> Path:
    """A transformers CLIP folder with a preprocessor config for the model's image size."""
    size = model.config.vision_config.image_size
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    CLIPImageProcessor(
        size={"shortest_edge": size},
        crop_size={"height": size, "width": size},
        image_mean=list(OPENAI_MEAN),
        image_std=list(OPENAI_STD),
    ).save_pretrained(folder)
    return folder


class TensorFeatures(torch.nn.Module):
    """CLIPModel whose get_*_features return tensors, as torchmetrics expects; transformers 5
    returns an output object (pooler_output holds the projected features)."""

    def __init__(self, model: CLIPModel):
        super().__init__()
        self.model = model
        self.config = model.config

    def get_image_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        out = self.model.get_image_features(pixel_values=pixel_values)
        return getattr(out, "pooler_output", out)

    def get_text_features(self, input_ids, attention_mask) -> torch.Tensor:
        out = self.model.get_text_features(input_ids=input_ids, attention_mask=attention_mask)
        return getattr(out, "pooler_output", out)


def torchmetrics_clip_scores(
    folder: Path, images: Sequence[Image.Image], prompts: Sequence[str]
) -> list[float]:
    """Per-image CLIP score from torchmetrics' CLIPScore, loading model and processor from `folder`."""
    from torchmetrics.multimodal.clip_score import CLIPScore

    metric = CLIPScore(
        model_name_or_path=lambda: (
            TensorFeatures(CLIPModel.from_pretrained(folder)),
            CLIPProcessor.from_pretrained(folder),
        )
    )
    scores = []
    for image, prompt in zip(images, prompts, strict=True):
        metric.reset()
        metric.update(uint8_tensor([image])[0], [prompt])
        scores.append(float(metric.compute()))
    return scores


def uint8_tensor(images: Sequence[Image.Image]) -> torch.Tensor:
    return torch.from_numpy(np.stack([np.asarray(i.convert("RGB")) for i in images])).permute(
        0, 3, 1, 2
    )


def to_pil(batch: torch.Tensor) -> list[Image.Image]:
    """(n, 3, H, W) uint8 -> PIL images."""
    return [Image.fromarray(x.permute(1, 2, 0).numpy()) for x in batch]

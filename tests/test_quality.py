"""models.quality against independent computations: torchmetrics, closed forms, hand cases."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from PIL import Image
from quality_helpers import save_clip_folder, to_pil, torchmetrics_clip_scores, uint8_tensor
from transformers import CLIPImageProcessor, CLIPModel

from models import quality
from models.clip import ClipScorer, build_tiny_clip


@pytest.fixture(scope="module")
def tiny_clip():
    return build_tiny_clip(0)


@pytest.fixture(scope="module")
def scorer(tiny_clip) -> ClipScorer:
    return ClipScorer(*tiny_clip)


@pytest.fixture(scope="module")
def clip_folder(tiny_clip, tmp_path_factory):
    return save_clip_folder(*tiny_clip, tmp_path_factory.mktemp("clip"))


def noise_images(n: int, seed: int, size: int = 64, blur: int = 1) -> list[Image.Image]:
    """Random RGB images; `blur` > 1 makes smoother ones (another distribution)."""
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, (n, size // blur, size // blur, 3), dtype=np.uint8)
    return [Image.fromarray(a).resize((size, size), Image.Resampling.BILINEAR) for a in small]


class ClipFeatures(torch.nn.Module):
    """torchmetrics' `feature` network: CLIP pooled vision features, preprocessed by transformers'
    own CLIPImageProcessor from the saved folder (not by ClipScorer)."""

    def __init__(self, folder):
        super().__init__()
        self.model = CLIPModel.from_pretrained(folder).eval()
        self.processor = CLIPImageProcessor.from_pretrained(folder)
        self.num_features = self.model.config.vision_config.hidden_size

    @torch.no_grad()
    def forward(self, batch: torch.Tensor) -> torch.Tensor:
        pixels = self.processor(images=to_pil(batch), return_tensors="pt")["pixel_values"]
        return self.model.vision_model(pixel_values=pixels).pooler_output


def test_clip_score_matches_torchmetrics(scorer, clip_folder):
    images = noise_images(5, seed=0)
    prompts = ["a red circle", "a blue square", "noise", "a cat", "an orange triangle"]
    ours = quality.clip_score_stats(scorer, images, prompts)
    theirs = torchmetrics_clip_scores(clip_folder, images, prompts)
    assert ours["per_image"] == pytest.approx(theirs, abs=1e-4)
    assert ours["mean"] == pytest.approx(np.mean(theirs), abs=1e-4)
    assert ours["std"] == pytest.approx(np.std(theirs), abs=1e-4)


def test_clip_features_match_transformers_preprocessing(scorer, clip_folder):
    images = noise_images(4, seed=1)
    ours = quality.clip_image_features(scorer, images)
    theirs = ClipFeatures(clip_folder)(uint8_tensor(images)).double()
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)


def test_fid_clip_matches_torchmetrics(scorer, clip_folder):
    from torchmetrics.image.fid import FrechetInceptionDistance

    real, fake = noise_images(12, seed=2), noise_images(10, seed=3, blur=4)
    metric = FrechetInceptionDistance(feature=ClipFeatures(clip_folder))
    metric.update(uint8_tensor(real), real=True)
    metric.update(uint8_tensor(fake), real=False)
    ours = quality.fid(
        quality.clip_image_features(scorer, fake), quality.clip_image_features(scorer, real)
    )
    assert ours > 0
    assert ours == pytest.approx(float(metric.compute()), rel=1e-4)


@pytest.mark.filterwarnings("ignore:Metric `Kernel Inception Distance` will save")
def test_kid_clip_matches_torchmetrics_on_the_whole_sets(scorer, clip_folder):
    from torchmetrics.image.kid import KernelInceptionDistance

    real, fake = noise_images(10, seed=4), noise_images(10, seed=5, blur=8)
    metric = KernelInceptionDistance(feature=ClipFeatures(clip_folder), subsets=3, subset_size=10)
    metric.update(uint8_tensor(real), real=True)
    metric.update(uint8_tensor(fake), real=False)
    mean, std = quality.kid(
        quality.clip_image_features(scorer, real), quality.clip_image_features(scorer, fake)
    )
    assert std == 0.0
    assert mean == pytest.approx(float(metric.compute()[0]), rel=1e-4)


def test_kid_subsets_are_seeded_and_match_torchmetrics_mmd():
    from torchmetrics.image.kid import poly_mmd

    gen = torch.Generator().manual_seed(0)
    a = torch.randn(30, 6, generator=gen, dtype=torch.float64)
    b = torch.randn(25, 6, generator=gen, dtype=torch.float64) * 1.5 + 0.3
    mean, std = quality.kid(a, b, subsets=7, subset_size=10, seed=3)
    picks = torch.Generator().manual_seed(3)
    values = []
    for _ in range(7):
        ia = torch.randperm(30, generator=picks)[:10]
        ib = torch.randperm(25, generator=picks)[:10]
        values.append(float(poly_mmd(a[ia], b[ib])))
    assert mean == pytest.approx(np.mean(values), rel=1e-9)
    assert std == pytest.approx(np.std(values), rel=1e-9)
    assert quality.kid(a, b, subsets=7, subset_size=10, seed=3) == (mean, std)


def test_mmd_of_unequal_sets_follows_the_unbiased_formula():
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(5, 3, generator=gen, dtype=torch.float64)
    y = torch.randn(7, 3, generator=gen, dtype=torch.float64)
    k = lambda p, q: (float(p @ q) / 3 + 1) ** 3  # noqa: E731
    xx = sum(k(x[i], x[j]) for i in range(5) for j in range(5) if i != j) / 20
    yy = sum(k(y[i], y[j]) for i in range(7) for j in range(7) if i != j) / 42
    xy = sum(k(x[i], y[j]) for i in range(5) for j in range(7)) / 35
    assert quality.mmd2_unbiased(x, y) == pytest.approx(xx + yy - 2 * xy, rel=1e-9)


def test_fid_of_a_set_with_itself_is_zero():
    features = torch.randn(50, 8, generator=torch.Generator().manual_seed(2))
    assert abs(quality.fid(features, features)) < 1e-8


def test_fid_of_rank_deficient_sets_is_finite_and_symmetric():
    gen = torch.Generator().manual_seed(5)
    a, b = torch.randn(4, 32, generator=gen), torch.randn(6, 32, generator=gen) + 1
    assert math.isfinite(quality.fid(a, b))
    assert quality.fid(a, b) == pytest.approx(quality.fid(b, a), rel=1e-6)


def test_frechet_distance_closed_form_for_gaussians_sharing_eigenvectors():
    # Σ1 = R diag(s1) Rᵀ, Σ2 = R diag(s2) Rᵀ: FID = ‖Δμ‖² + Σ (√s1 − √s2)².
    gen = torch.Generator().manual_seed(3)
    rotation, _ = torch.linalg.qr(torch.randn(4, 4, generator=gen, dtype=torch.float64))
    s1 = torch.tensor([1.0, 4.0, 0.25, 9.0], dtype=torch.float64)
    s2 = torch.tensor([4.0, 1.0, 1.0, 16.0], dtype=torch.float64)
    mu1 = torch.tensor([0.0, 1.0, 2.0, 3.0], dtype=torch.float64)
    mu2 = torch.tensor([1.0, 1.0, 0.0, 3.0], dtype=torch.float64)
    expected = 1 + 4 + float(((s1.sqrt() - s2.sqrt()) ** 2).sum())  # = 5 + 1 + 1 + 0.25 + 1
    value = quality.frechet_distance(
        mu1, rotation @ torch.diag(s1) @ rotation.T, mu2, rotation @ torch.diag(s2) @ rotation.T
    )
    assert value == pytest.approx(expected, rel=1e-9)
    # One dimension: N(0, 1) vs N(1, 4) -> 1 + (1 - 2)² = 2.
    one = torch.tensor([[1.0]], dtype=torch.float64)
    value = quality.frechet_distance(torch.zeros(1), one, torch.ones(1), 4 * one)
    assert value == pytest.approx(2.0)


def test_frechet_distance_matches_torchmetrics_for_non_commuting_covariances():
    from torchmetrics.image.fid import _compute_fid

    gen = torch.Generator().manual_seed(4)
    a, b = torch.randn(6, 6, generator=gen), torch.randn(6, 6, generator=gen)
    s1, s2 = (a @ a.T).double(), (b @ b.T).double()
    mu1, mu2 = torch.randn(6, generator=gen).double(), torch.randn(6, generator=gen).double()
    assert quality.frechet_distance(mu1, s1, mu2, s2) == pytest.approx(
        float(_compute_fid(mu1, s1, mu2, s2)), rel=1e-7
    )


def test_ssim_matches_torchmetrics_on_the_valid_region():
    from torchmetrics.image import StructuralSimilarityIndexMeasure

    gen = torch.Generator().manual_seed(6)
    a = torch.rand(3, 3, 40, 48, generator=gen, dtype=torch.float64)
    b = (a + 0.15 * torch.randn(a.shape, generator=gen, dtype=torch.float64)).clamp(0, 1)
    metric = StructuralSimilarityIndexMeasure(
        data_range=1.0, reduction="none", return_full_image=True
    )
    _, full = metric(b, a)
    pad = quality.SSIM_WINDOW // 2
    theirs = full[..., pad:-pad, pad:-pad].flatten(1).mean(dim=1)
    torch.testing.assert_close(quality.ssim(b, a), theirs, atol=1e-10, rtol=1e-10)


def test_ssim_of_identical_images_is_one_and_refuses_mismatched_sizes():
    images = quality.to_tensor(noise_images(2, seed=7))
    assert quality.ssim(images, images).tolist() == pytest.approx([1.0, 1.0])
    flat = torch.full((1, 3, 16, 16), 0.5, dtype=torch.float64)
    assert quality.ssim(flat, flat).item() == pytest.approx(1.0)
    with pytest.raises(ValueError, match="one size"):
        quality.ssim(images, images[..., :32])


def test_lpips_clip_is_zero_for_identical_images_and_positive_otherwise(scorer):
    a, b = noise_images(3, seed=8), noise_images(3, seed=9, blur=4)
    assert quality.lpips_clip(scorer, a, a).tolist() == pytest.approx([0.0] * 3, abs=1e-12)
    distances = quality.lpips_clip(scorer, a, b)
    assert (distances > 0).all()
    torch.testing.assert_close(distances, quality.lpips_clip(scorer, b, a))


def test_lpips_clip_matches_a_numpy_computation(scorer, clip_folder):
    a, b = noise_images(2, seed=10), noise_images(2, seed=11, blur=2)
    model = CLIPModel.from_pretrained(clip_folder).eval()
    processor = CLIPImageProcessor.from_pretrained(clip_folder)

    def layers(images):
        pixels = processor(images=images, return_tensors="pt")["pixel_values"]
        with torch.no_grad():
            out = model.vision_model(pixel_values=pixels, output_hidden_states=True)
        return [h[:, 1:].double().numpy() for h in out.hidden_states[1:]]

    expected = np.zeros(2)
    layers_a, layers_b = layers(a), layers(b)
    for ha, hb in zip(layers_a, layers_b, strict=True):
        na = ha / (np.linalg.norm(ha, axis=-1, keepdims=True) + 1e-10)
        nb = hb / (np.linalg.norm(hb, axis=-1, keepdims=True) + 1e-10)
        expected += ((na - nb) ** 2).sum(axis=-1).mean(axis=-1)
    expected /= len(layers_a)
    assert quality.lpips_clip(scorer, a, b).numpy() == pytest.approx(expected, rel=1e-5)


SCORE_IN_A_FRESH_PROCESS = """
import logging
import warnings

warnings.simplefilter("always")
with warnings.catch_warnings(record=True) as caught:
    from PIL import Image

    from models.clip import ClipScorer, build_tiny_clip, save_clip

    save_clip(*build_tiny_clip(0), "clip-tiny", source="tiny:seed=0", reuse_identical=True)
    scorer = ClipScorer.from_store("clip-tiny")
    print("score", float(scorer.clip_scores([Image.new("RGB", (64, 64), "red")], ["red"])[0, 0]))
for warning in caught:
    print("warning:", warning.message)
"""


def test_building_the_clip_scorer_warns_of_no_torchvision():
    """transformers 5 means torchvision's backend by `CLIPImageProcessor`, which diffusers' SDXL
    pipeline imports; without torchvision (not a dependency) it warned on every run. `models`
    names the PIL processors first. A fresh process: in this one the warning may be long gone."""
    import os
    import subprocess
    import sys

    result = subprocess.run(
        [sys.executable, "-c", SCORE_IN_A_FRESH_PROCESS],
        capture_output=True,
        text=True,
        env=dict(os.environ),
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert "score" in result.stdout
    output = result.stdout + result.stderr  # warnings, and transformers' log lines on stderr
    assert "torchvision" not in output.lower(), output[-2000:]

"""Image-quality metrics: CLIP score, FID and KID on CLIP features, SSIM, and an unlearned LPIPS.

No Inception or LPIPS weights can be downloaded here, so the feature network of every learned
metric is the CLIP model from the store (kind "clip"), and the names say so:

- `fid_clip`, `kid_clip`: FID (Heusel et al. 2017) and KID (Bińkowski et al. 2018) computed on
  CLIP image features instead of Inception pool3 features. The feature is CLIP's pooled vision
  output *before* the projection (`vision_model(...).pooler_output`), the analogue of Inception's
  pool3 (the layer before its classifier). Values are not comparable with published Inception FID.
- `lpips_clip`: the *unlearned* variant of LPIPS (Zhang et al. 2018, "lin" weights all 1) on the
  CLIP vision tower's hidden states: per encoder layer, each patch token's feature vector is
  unit-normalised over channels, the squared difference summed over channels and averaged over
  tokens, then averaged over layers. The class token is left out, as LPIPS averages over spatial
  positions only.
- `ssim`: Wang et al. 2004 on RGB in [0, 1] (Gaussian window 11, σ 1.5, K1 0.01, K2 0.03),
  averaged over channels and the valid positions of the window, as the authors' reference code
  does (torchmetrics 1.9 reflect-pads and averages the whole map; the maps agree where the window
  fits).
- `clip_score`: Hessel et al. 2021 as torchmetrics computes it, 100 × max(cos(image, text), 0).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image

from models.clip import ClipScorer

log = logging.getLogger(__name__)

HIGHER_IS_BETTER = {
    "clip_score": True,
    "ssim": True,
    "lpips_clip": False,
    "fid_clip": False,
    "kid_clip": False,
}
"""Every metric this module computes, and its direction."""

SSIM_WINDOW = 11
SSIM_SIGMA = 1.5
SSIM_K1, SSIM_K2 = 0.01, 0.03
BATCH = 32
"""Images per CLIP forward pass."""


def clip_score_stats(
    scorer: ClipScorer, images: Sequence[Image.Image], prompts: Sequence[str]
) -> dict[str, object]:
    """Per-image CLIP score of each image against its own prompt, with mean and (population) std."""
    if len(images) != len(prompts):
        raise ValueError(f"{len(images)} images but {len(prompts)} prompts")
    scores = torch.cat(
        [
            scorer.clip_scores(images[i : i + BATCH], prompts[i : i + BATCH]).diagonal()
            for i in range(0, len(images), BATCH)
        ]
    )
    return {
        "mean": float(scores.mean()),
        "std": float(scores.std(unbiased=False)),
        "per_image": [float(s) for s in scores],
    }


@torch.no_grad()
def clip_image_features(scorer: ClipScorer, images: Sequence[Image.Image]) -> torch.Tensor:
    """(n, hidden) CLIP pooled vision features before the projection, float64 on the CPU."""
    out = []
    for i in range(0, len(images), BATCH):
        pixels = scorer.preprocess(images[i : i + BATCH]).to(scorer.device, scorer.model.dtype)
        out.append(scorer.model.vision_model(pixel_values=pixels).pooler_output.double().cpu())
    return torch.cat(out)


@torch.no_grad()
def clip_hidden_states(scorer: ClipScorer, images: Sequence[Image.Image]) -> list[torch.Tensor]:
    """Per encoder layer, (n, patches, channels) hidden states of the patch tokens (no class token)."""
    per_batch = []
    for i in range(0, len(images), BATCH):
        pixels = scorer.preprocess(images[i : i + BATCH]).to(scorer.device, scorer.model.dtype)
        states = scorer.model.vision_model(pixel_values=pixels, output_hidden_states=True)
        # hidden_states[0] is the embedding output (patches before any layer); LPIPS looks at
        # what the network computed, so the layers' outputs are used.
        per_batch.append([h[:, 1:].double().cpu() for h in states.hidden_states[1:]])
    return [torch.cat(layer) for layer in zip(*per_batch, strict=True)]


def lpips_clip(
    scorer: ClipScorer, images_a: Sequence[Image.Image], images_b: Sequence[Image.Image]
) -> torch.Tensor:
    """Per pair, the unlearned LPIPS distance on CLIP vision hidden states (0 for identical images)."""
    if len(images_a) != len(images_b):
        raise ValueError(f"lpips_clip compares pairs: {len(images_a)} vs {len(images_b)} images")
    layers_a = clip_hidden_states(scorer, images_a)
    layers_b = clip_hidden_states(scorer, images_b)
    distances = [
        (_unit(a) - _unit(b)).square().sum(dim=-1).mean(dim=-1)
        for a, b in zip(layers_a, layers_b, strict=True)
    ]
    return torch.stack(distances).mean(dim=0)


def _unit(x: torch.Tensor, eps: float = 1e-10) -> torch.Tensor:
    # LPIPS's normalize_tensor: divide by the channel norm, with eps inside against zero vectors.
    return x / (x.square().sum(dim=-1, keepdim=True).sqrt() + eps)


def frechet_distance(
    mu1: torch.Tensor, sigma1: torch.Tensor, mu2: torch.Tensor, sigma2: torch.Tensor
) -> float:
    """‖μ1−μ2‖² + tr(Σ1) + tr(Σ2) − 2 tr((Σ1 Σ2)^½).

    tr((Σ1 Σ2)^½) = tr((Σ1^½ Σ2 Σ1^½)^½): the inner matrix is symmetric positive semi-definite,
    so both square roots come from symmetric eigendecompositions (no scipy, no complex numbers).
    """
    mu1, sigma1, mu2, sigma2 = (t.double() for t in (mu1, sigma1, mu2, sigma2))
    root1 = _sqrt_psd(sigma1)
    inner = root1 @ sigma2 @ root1
    inner = (inner + inner.T) / 2  # symmetric up to rounding; eigvalsh needs it exactly
    trace_root = torch.linalg.eigvalsh(inner).clamp(min=0).sqrt().sum()
    value = (mu1 - mu2).square().sum() + sigma1.trace() + sigma2.trace() - 2 * trace_root
    return float(value)


def _sqrt_psd(matrix: torch.Tensor) -> torch.Tensor:
    values, vectors = torch.linalg.eigh((matrix + matrix.T) / 2)
    return (vectors * values.clamp(min=0).sqrt()) @ vectors.T


def gaussian_fit(features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and unbiased covariance (n − 1) of (n, d) features, as torchmetrics' FID computes them."""
    if features.shape[0] < 2:
        raise ValueError(
            f"a Gaussian fit needs at least 2 feature vectors, got {features.shape[0]}"
        )
    features = features.double()
    mu = features.mean(dim=0)
    centered = features - mu
    return mu, centered.T @ centered / (features.shape[0] - 1)


def fid(features_a: torch.Tensor, features_b: torch.Tensor) -> float:
    """Fréchet distance between Gaussian fits of two (n, d) feature sets (`fid_clip` on CLIP features)."""
    return frechet_distance(*gaussian_fit(features_a), *gaussian_fit(features_b))


def polynomial_kernel(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """KID's cubic kernel k(x, y) = (x·y / d + 1)³."""
    return (x @ y.T / x.shape[1] + 1.0) ** 3


def mmd2_unbiased(x: torch.Tensor, y: torch.Tensor) -> float:
    """Unbiased MMD² with the cubic polynomial kernel; the sets may differ in size (≥ 2 each)."""
    x, y = x.double(), y.double()
    m, n = x.shape[0], y.shape[0]
    k_xx, k_yy, k_xy = polynomial_kernel(x, x), polynomial_kernel(y, y), polynomial_kernel(x, y)
    xx = (k_xx.sum() - k_xx.diagonal().sum()) / (m * (m - 1))
    yy = (k_yy.sum() - k_yy.diagonal().sum()) / (n * (n - 1))
    return float(xx + yy - 2 * k_xy.sum() / (m * n))


def kid(
    features_a: torch.Tensor,
    features_b: torch.Tensor,
    *,
    subsets: int = 100,
    subset_size: int = 1000,
    seed: int = 0,
) -> tuple[float, float]:
    """KID (mean, std over subsets) between two (n, d) feature sets (`kid_clip` on CLIP features).

    As torchmetrics: `subsets` random subsets of `subset_size` from each set, drawn without
    replacement with a generator seeded by `seed`, std over subsets without Bessel's correction.
    When `subset_size` reaches the smaller set, the whole sets are compared once (std 0).
    """
    a, b = features_a.double(), features_b.double()
    if min(a.shape[0], b.shape[0]) < 2:
        raise ValueError(f"KID needs at least 2 images per set, got {a.shape[0]} and {b.shape[0]}")
    if subset_size >= min(a.shape[0], b.shape[0]):
        return mmd2_unbiased(a, b), 0.0
    generator = torch.Generator().manual_seed(seed)
    values = []
    for _ in range(subsets):
        pick_a = torch.randperm(a.shape[0], generator=generator)[:subset_size]
        pick_b = torch.randperm(b.shape[0], generator=generator)[:subset_size]
        values.append(mmd2_unbiased(a[pick_a], b[pick_b]))
    scores = torch.tensor(values, dtype=torch.float64)
    return float(scores.mean()), float(scores.std(unbiased=False))


def to_tensor(images: Sequence[Image.Image]) -> torch.Tensor:
    """(n, 3, H, W) float64 RGB in [0, 1]; the images must share one size."""
    arrays = [np.asarray(image.convert("RGB"), dtype=np.float64) / 255.0 for image in images]
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2)


def _gaussian_window(size: int = SSIM_WINDOW, sigma: float = SSIM_SIGMA) -> torch.Tensor:
    coords = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    g = torch.exp(-(coords**2) / (2 * sigma**2))
    g = g / g.sum()
    return torch.outer(g, g)


def ssim(a: torch.Tensor, b: torch.Tensor, data_range: float = 1.0) -> torch.Tensor:
    """Per pair, SSIM of (n, c, H, W) images in [0, data_range], mean over channels and the valid
    positions of the 11×11 Gaussian window (1 for identical images)."""
    if a.shape != b.shape:
        raise ValueError(f"SSIM compares images of one size: {tuple(a.shape)} vs {tuple(b.shape)}")
    if min(a.shape[-2:]) < SSIM_WINDOW:
        raise ValueError(f"SSIM needs images of at least {SSIM_WINDOW}×{SSIM_WINDOW} pixels")
    a, b = a.double(), b.double()
    channels = a.shape[1]
    window = _gaussian_window().expand(channels, 1, SSIM_WINDOW, SSIM_WINDOW)

    def blur(x: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.conv2d(x, window, groups=channels)

    c1, c2 = (SSIM_K1 * data_range) ** 2, (SSIM_K2 * data_range) ** 2
    mu_a, mu_b = blur(a), blur(b)
    var_a = (blur(a * a) - mu_a**2).clamp(min=0)  # rounding can make a flat patch negative
    var_b = (blur(b * b) - mu_b**2).clamp(min=0)
    cov = blur(a * b) - mu_a * mu_b
    index = ((2 * mu_a * mu_b + c1) * (2 * cov + c2)) / (
        (mu_a**2 + mu_b**2 + c1) * (var_a + var_b + c2)
    )
    return index.flatten(1).mean(dim=1)

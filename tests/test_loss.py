"""The loss pieces against their definitions, computed by hand."""

from __future__ import annotations

import torch
from diffusers import DDPMScheduler

from models.sdxl_config import SCHEDULER_CONFIG
from train.loss import diffusion_loss, loss_weights, make_noise, snr, target_for

SCHEDULER = DDPMScheduler(
    **{
        k: v
        for k, v in SCHEDULER_CONFIG.items()
        if k not in ("interpolation_type", "use_karras_sigmas")
    }
)


def test_snr_is_alpha_bar_over_one_minus_alpha_bar():
    t = torch.tensor([0, 499, 999])
    a = SCHEDULER.alphas_cumprod[t]
    assert torch.allclose(snr(SCHEDULER, t), a / (1 - a))


def test_min_snr_weights_for_epsilon_and_v():
    t = torch.tensor([10, 500, 990])
    s = snr(SCHEDULER, t)
    gamma = 5.0
    eps = loss_weights(SCHEDULER, t, gamma, "epsilon")
    v = loss_weights(SCHEDULER, t, gamma, "v_prediction")
    assert torch.allclose(eps, torch.minimum(s, torch.tensor(gamma)) / s)
    assert torch.allclose(v, torch.minimum(s, torch.tensor(gamma)) / (s + 1))
    assert eps[0] < 1 and eps[-1] == 1  # low noise (high SNR) is down-weighted, high noise is not
    assert torch.equal(loss_weights(SCHEDULER, t, 0.0, "epsilon"), torch.ones(3))


def test_targets():
    latents, noise = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8)
    t = torch.tensor([100, 800])
    assert torch.equal(target_for(SCHEDULER, latents, noise, t, "epsilon"), noise)
    a = SCHEDULER.alphas_cumprod[t].view(-1, 1, 1, 1)
    v = a.sqrt() * noise - (1 - a).sqrt() * latents
    assert torch.allclose(target_for(SCHEDULER, latents, noise, t, "v_prediction"), v, atol=1e-6)


def test_offset_noise_shifts_each_channel_by_a_constant():
    plain = make_noise(torch.Size((2, 4, 32, 32)), torch.Generator().manual_seed(0))
    offset = make_noise(torch.Size((2, 4, 32, 32)), torch.Generator().manual_seed(0), offset=0.5)
    shift = offset - plain
    assert torch.allclose(shift, shift[:, :, :1, :1].expand_as(shift), atol=1e-6)  # per channel
    assert shift.abs().mean() > 0.05


def test_weighted_loss_is_the_weighted_mean_of_per_sample_mse():
    pred, target = torch.zeros(2, 1, 2, 2), torch.ones(2, 1, 2, 2)
    target[1] *= 2
    weights = torch.tensor([1.0, 0.5])
    assert torch.isclose(diffusion_loss(pred, target, weights), torch.tensor((1 * 1 + 4 * 0.5) / 2))

"""The parts that make training independent of how a global batch is split into processes and
micro-batches: the global-batch schedule, per-example noise, per-example LoRA dropout."""

from __future__ import annotations

from collections import Counter

import pytest
import torch
from diffusers import DDPMScheduler

from train.batches import Batch, BatchSchedule
from train.lora import SampleSeeds, SeededDropout
from train.loss import denoising_loss

# --- the schedule


def test_a_step_is_one_global_batch_of_one_bucket():
    buckets = ["a"] * 7 + ["b"] * 5
    schedule = BatchSchedule(buckets, 4, seed=0)
    for step in range(40):
        _, examples = schedule.batch(step)
        assert len(examples) == 4
        assert len({buckets[i] for i in examples}) == 1


def test_each_bucket_shows_every_example_once_before_repeating_one():
    buckets = ["a"] * 7 + ["b"] * 5
    schedule = BatchSchedule(buckets, 4, seed=3)
    seen: dict[str, list[int]] = {"a": [], "b": []}
    for step in range(30):
        _, examples = schedule.batch(step)
        seen[buckets[examples[0]]] += examples
    for bucket, n in (("a", 7), ("b", 5)):
        stream = seen[bucket]
        for epoch in range(len(stream) // n):
            assert sorted(stream[epoch * n : (epoch + 1) * n]) == [
                i for i, b in enumerate(buckets) if b == bucket
            ]
    # a round gives each bucket the batches one of its epochs fills: 2 for a, 2 for b
    assert Counter(buckets[schedule.batch(s)[1][0]] for s in range(4)) == {"a": 2, "b": 2}


def test_one_bucket_is_a_stream_of_epochs_cut_into_global_batches():
    schedule = BatchSchedule([0] * 10, 4, seed=1)
    stream = [i for step in range(5) for i in schedule.batch(step)[1]]
    assert sorted(stream[:10]) == sorted(stream[10:20]) == list(range(10))
    # the epoch of each step is that of its first example (positions 0, 4, 8, 12, 16)
    assert [schedule.batch(s)[0] for s in range(5)] == [0, 0, 0, 1, 1]


def test_the_schedule_is_a_pure_function_of_seed_and_step():
    buckets = [i % 3 for i in range(20)]
    first = BatchSchedule(buckets, 4, seed=5)
    steps = [first.batch(s) for s in range(50)]
    again = BatchSchedule(buckets, 4, seed=5)
    assert [again.batch(s) for s in reversed(range(50))] == list(reversed(steps))
    assert [BatchSchedule(buckets, 4, seed=6).batch(s) for s in range(50)] != steps


def test_a_bucket_smaller_than_the_global_batch_fills_it_with_repeats():
    _, examples = BatchSchedule([0, 0, 0], 8, seed=0).batch(0)
    assert len(examples) == 8 and set(examples) == {0, 1, 2}


# --- per-example randomness


def batch_of(latents: torch.Tensor) -> Batch:
    n = latents.shape[0]
    return Batch(latents, torch.zeros(n, 6), torch.zeros(n, 3, 8), torch.zeros(n, 8), [""] * n)


class Echo(torch.nn.Module):
    """A 'UNet' that returns its input: the loss then shows the noise and timestep drawn."""

    def forward(self, noisy, timesteps, **_):
        return (noisy * (1 + timesteps.view(-1, 1, 1, 1) / 1000),)


def per_example_loss(batch: Batch, seeds: list[int]) -> torch.Tensor:
    return denoising_loss(
        None,
        Echo(),
        DDPMScheduler(),
        batch,
        generators=[torch.Generator().manual_seed(s) for s in seeds],
        prediction_type="epsilon",
        snr_gamma=5.0,
        noise_offset=0.1,
        device=torch.device("cpu"),
        dtype=torch.float32,
    )


def test_an_examples_noise_and_timestep_do_not_depend_on_its_batch():
    latents = torch.randn(4, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    seeds = [11, 12, 13, 14]
    whole = per_example_loss(batch_of(latents), seeds)
    halves = [per_example_loss(batch_of(latents[i : i + 2]), seeds[i : i + 2]) for i in (0, 2)]
    singles = [per_example_loss(batch_of(latents[i : i + 1]), seeds[i : i + 1]) for i in range(4)]
    assert torch.allclose(whole, sum(halves) / 2, rtol=1e-6)
    assert torch.allclose(whole, sum(singles) / 4, rtol=1e-6)
    with pytest.raises(ValueError, match="3 generators for a batch of 4"):
        per_example_loss(batch_of(latents), seeds[:3])


def test_lora_dropout_masks_an_example_by_its_own_seed_only():
    seeds = SampleSeeds()
    dropout = SeededDropout(0.5, seeds, layer=3)
    x = torch.ones(4, 16, 8)
    seeds.seeds = (1, 2, 3, 4)
    whole = dropout(x)
    seeds.seeds = (3, 4)
    assert torch.equal(dropout(x[:2]), whole[2:])  # same seeds, other batch: same masks
    seeds.seeds = (1, 2, 3, 4)
    assert torch.equal(dropout(x), whole)  # a recomputation (gradient checkpointing) agrees
    assert set(whole.unique().tolist()) == {0.0, 2.0}  # inverted dropout, as nn.Dropout
    assert not torch.equal(whole[0], whole[1])
    other_layer = SeededDropout(0.5, seeds, layer=4)
    assert not torch.equal(other_layer(x), whole)
    dropout.eval()
    assert dropout(x) is x
    dropout.train()
    seeds.seeds = (1,)
    with pytest.raises(RuntimeError, match="1 example seeds for a batch of 4"):
        dropout(x)

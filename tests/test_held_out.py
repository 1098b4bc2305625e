"""Images held out of training (validation_split, validation_dir): which ones, the refusals,
and what a trained adapter records of them."""

from __future__ import annotations

import shutil

import pytest

from models.adapter import get_adapter
from train.config import ConfigError, TrainConfig
from train.data import DatasetError, hold_out, scan_dataset, training_data
from train.loop import train
from train.sample_data import write_sample_dataset


@pytest.fixture
def twenty(tmp_path):
    return write_sample_dataset(tmp_path / "data", count=20)


def names(scan) -> list[str]:
    return [scan.relative(e) for e in scan.examples]


def test_split_holds_out_the_stated_share_the_same_every_time(twenty):
    scan = scan_dataset(twenty)
    trained, held = hold_out(scan, 0.2)
    assert len(held.examples) == 4 and len(trained.examples) == 16
    assert not set(names(held)) & set(names(trained))
    assert names(hold_out(scan_dataset(twenty), 0.2)[1]) == names(held)
    assert trained.fingerprint() != scan.fingerprint()  # the cache key follows the training set
    assert len(hold_out(scan, 0.01)[1].examples) == 1  # at least one


def test_adding_images_moves_few_held_out_ones(twenty, tmp_path):
    before = set(names(hold_out(scan_dataset(twenty), 0.2)[1]))
    more = write_sample_dataset(tmp_path / "more", count=5, seed=9)
    for path in more.iterdir():
        shutil.copy(path, twenty / f"new-{path.name}")
    after = set(names(hold_out(scan_dataset(twenty), 0.2)[1]))
    assert len(after) == 5 and len(before & after) >= 3


def test_identical_files_stay_on_one_side(twenty):
    scan = scan_dataset(twenty)
    held = names(hold_out(scan, 0.2)[1])
    first = twenty / held[0]
    for i in range(3):  # copies of a held-out image under names that rank anywhere
        shutil.copy(first, twenty / f"copy{i}.png")
        shutil.copy(first.with_suffix(".txt"), twenty / f"copy{i}.txt")
    trained, held = hold_out(scan_dataset(twenty), 0.2)
    trained_bytes = {p.path.read_bytes() for p in trained.examples}
    assert not any(e.path.read_bytes() in trained_bytes for e in held.examples)


def test_a_split_that_leaves_nothing_to_train_is_refused(tmp_path):
    one = write_sample_dataset(tmp_path / "one", count=1)
    with pytest.raises(DatasetError, match="leaves none to train on; lower validation_split"):
        hold_out(scan_dataset(one), 0.5)


def test_a_validation_folder_is_held_out_and_may_not_repeat_training_images(twenty, tmp_path):
    other = write_sample_dataset(tmp_path / "held", count=3, seed=4)
    config = TrainConfig(data_dir=str(twenty), name="n", validation_dir=str(other))
    trained, held = training_data(config)
    assert len(trained.examples) == 20 and len(held.examples) == 3
    shutil.copy(twenty / "0005.png", other / "leak.png")
    (other / "leak.txt").write_text("a leak")
    with pytest.raises(DatasetError, match=r"1 image\(s\) are also in data_dir .*leak.png"):
        training_data(config)


def test_bad_held_out_settings_are_config_errors():
    with pytest.raises(ConfigError) as err:
        TrainConfig(data_dir="d", name="n", validation_split=1.0, validation_dir="v")
    assert "validation_split: 1.0 must be in [0, 1)" in str(err.value)
    assert "validation_split, validation_dir: set one of them" in str(err.value)


def test_training_leaves_held_out_images_out_and_records_them(tiny_base, twenty, tmp_path):
    config = TrainConfig(
        base="sdxl-tiny",
        data_dir=str(twenty),
        name="held-out",
        output_dir=str(tmp_path / "runs"),
        cache_dir=str(tmp_path / "cache"),
        resolution=64,
        rank=2,
        batch_size=2,
        max_steps=2,
        validation_split=0.2,
        tensorboard=False,
    )
    result = train(config)
    dataset = get_adapter(result.tag).metadata["dataset"]
    held = dataset["held_out"]
    assert dataset["examples"] == 16 and held["examples"] == 4
    assert held["root"] == str(twenty.resolve())
    expected = names(hold_out(scan_dataset(twenty), 0.2)[1])
    assert [image["file"] for image in held["images"]] == expected
    assert all(len(image["sha256"]) == 64 and image["caption"] for image in held["images"])
    # the cache holds the 16 training examples only
    [cache] = [p for p in (tmp_path / "cache").iterdir() if p.is_dir()]
    assert len(list(cache.glob("*.safetensors"))) == 16

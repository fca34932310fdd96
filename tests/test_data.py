"""The shared DataModule: sources, splits, batches as index slices, binarization, bad files."""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np
import pytest
import lightning.pytorch as pl
import torch

from conftest import small_mnist
from aevae.builtin_sources import DEBIAN_FASHION_MNIST, read_idx
from aevae.data import ImageDataModule
from aevae.errors import UsageError


def test_mnist_5k_split_is_deterministic_and_disjoint() -> None:
    first, second = ImageDataModule(source="mnist-5k"), ImageDataModule(source="mnist-5k")
    first.setup(), second.setup()
    sizes = {split: len(first.splits[split]) for split in ("train", "val", "test")}
    assert sizes == {"train": 3600, "val": 400, "test": 1000}
    for split in sizes:
        assert torch.equal(first.splits[split].images, second.splits[split].images)
    train = {bytes(image.numpy()) for image in first.splits["train"].images}
    assert not any(bytes(image.numpy()) in train for image in first.splits["test"].images)
    assert set(first.splits["test"].labels.tolist()) == set(range(10))


def test_batches_are_index_slices_of_one_tensor() -> None:
    data = ImageDataModule(source="mnist-5k", batch_size=50)
    data.setup()
    batch = next(iter(data.val_dataloader()))
    assert batch[0].shape == (50, 1, 28, 28) and batch[0].dtype == torch.uint8  # a quarter of the bytes to move
    assert torch.equal(batch[0], data.splits["val"].images[:50])
    images, labels = data.on_after_batch_transfer(batch, 0)  # floats on the device that trains
    assert images.dtype == torch.float32 and 0.0 <= images.min() and images.max() <= 1.0 and images.max() > 0.5
    assert torch.equal(images, data.splits["val"].images[:50].float() / 255)
    assert torch.equal(labels, data.splits["val"].labels[:50])


def test_seed_changes_the_validation_split() -> None:
    a, b = ImageDataModule(source="mnist-5k", split_seed=0), ImageDataModule(source="mnist-5k", split_seed=1)
    a.setup(), b.setup()
    assert not torch.equal(a.splits["val"].images, b.splits["val"].images)


def test_binarize_fixes_eval_pixels_and_samples_training_batches() -> None:
    data = ImageDataModule(source="mnist-5k", binarize=True)
    data.setup()
    again = ImageDataModule(source="mnist-5k", binarize=True)
    again.setup()
    assert set(data.splits["test"].images.unique().tolist()) == {0, 255}  # sampled once, kept as uint8
    assert torch.equal(data.splits["test"].images, again.splits["test"].images)  # seeded, once
    test_batch, _ = data.on_after_batch_transfer(next(iter(data.test_dataloader())), 0)
    assert set(test_batch.unique().tolist()) == {0.0, 1.0}
    train = data.splits["train"].images[:512]
    assert len(set(train.unique().tolist())) > 100  # stored grey: sampled per batch
    data.trainer = pl.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False)
    data.trainer.training = True
    first, _ = data.on_after_batch_transfer((train, None), 0)
    second, _ = data.on_after_batch_transfer((train, None), 0)
    assert set(first.unique().tolist()) == {0.0, 1.0} and not torch.equal(first, second)
    grey = train.float() / 255  # a pixel is 1 with its grey value's probability
    assert abs(first.mean().item() - grey.mean().item()) < 0.01


def test_written_idx_files_load_as_mnist(tmp_path: Path) -> None:
    raw = small_mnist(tmp_path)
    data = ImageDataModule(source="mnist", root=str(tmp_path), val_fraction=0.25)
    data.setup()
    assert {split: len(data.splits[split]) for split in ("train", "val", "test")} == {"train": 15, "val": 5, "test": 10}
    expected = torch.from_numpy(read_idx(raw / "t10k-images-idx3-ubyte.gz").copy()).unsqueeze(1)  # uint8 in memory
    assert torch.equal(data.splits["test"].images, expected)


def test_full_size_idx_files_load_as_mnist(tmp_path: Path) -> None:
    """The 60k/10k IDX files every fresh Debian set-up has (Fashion-MNIST), read by the MNIST loader."""
    raw = tmp_path / "MNIST" / "raw"
    raw.mkdir(parents=True)
    for file in DEBIAN_FASHION_MNIST.glob("*.gz"):
        (raw / file.name).symlink_to(file)
    data = ImageDataModule(source="mnist", root=str(tmp_path), val_fraction=0.1)
    data.setup()
    assert {split: len(data.splits[split]) for split in ("train", "val", "test")} == {
        "train": 54000,
        "val": 6000,
        "test": 10000,
    }
    assert data.splits["test"].labels[:5].tolist() == [9, 2, 1, 1, 6]  # the well-known first test items


def test_fashion_mnist_found_in_debian_folder(tmp_path: Path) -> None:
    assert DEBIAN_FASHION_MNIST.is_dir(), "make test installs Debian's dataset-fashion-mnist"
    data = ImageDataModule(source="fashion-mnist", root=str(tmp_path))
    data.setup()
    assert len(data.splits["test"]) == 10000 and len(data.splits["train"]) + len(data.splits["val"]) == 60000


def test_truncated_file_is_one_clear_error(tmp_path: Path) -> None:
    raw = small_mnist(tmp_path)
    content = gzip.decompress((raw / "t10k-labels-idx1-ubyte.gz").read_bytes())
    (raw / "t10k-labels-idx1-ubyte.gz").write_bytes(gzip.compress(content[:-3]))
    with pytest.raises(UsageError, match="t10k-labels-idx1-ubyte.gz is truncated or corrupt"):
        ImageDataModule(source="mnist", root=str(tmp_path)).setup()


def test_corrupt_gzip_is_one_clear_error(tmp_path: Path) -> None:
    raw = small_mnist(tmp_path)
    (raw / "train-images-idx3-ubyte.gz").write_bytes(b"not a gzip file at all")
    with pytest.raises(UsageError, match="train-images-idx3-ubyte.gz is unreadable"):
        ImageDataModule(source="mnist", root=str(tmp_path)).setup()


def test_missing_files_name_the_folder(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match=f"not found in {tmp_path / 'MNIST' / 'raw'}"):
        ImageDataModule(source="mnist", root=str(tmp_path)).setup()


def test_read_idx_reads_plain_and_gzip(tmp_path: Path) -> None:
    array = np.arange(24, dtype=np.uint8).reshape(2, 3, 4)
    raw = bytes([0, 0, 8, 3]) + b"".join(n.to_bytes(4, "big") for n in array.shape) + array.tobytes()
    (tmp_path / "a").write_bytes(raw)
    (tmp_path / "a.gz").write_bytes(gzip.compress(raw))
    assert np.array_equal(read_idx(tmp_path / "a"), array)
    assert np.array_equal(read_idx(tmp_path / "a.gz"), array)


@pytest.mark.parametrize("kwargs", [{"batch_size": 0}, {"val_fraction": 1.0}, {"source": "cifar"}])
def test_bad_arguments_name_the_field(kwargs: dict) -> None:
    with pytest.raises(UsageError, match="data\\."):
        ImageDataModule(**kwargs)


def test_classes_keep_only_those_labels_in_every_split() -> None:
    data = ImageDataModule(source="mnist-5k", classes=[3, 0, 8])
    data.setup()
    full = ImageDataModule(source="mnist-5k")
    full.setup()
    for split in ("train", "val", "test"):
        assert set(data.splits[split].labels.tolist()) == {0, 3, 8}
    test_labels = full.splits["test"].labels
    kept = torch.isin(test_labels, torch.tensor([0, 3, 8]))
    assert torch.equal(data.splits["test"].images, full.splits["test"].images[kept])  # same images, same order
    assert len(data.splits["train"]) + len(data.splits["val"]) == int(
        torch.isin(torch.cat([full.splits["train"].labels, full.splits["val"].labels]), torch.tensor([0, 3, 8])).sum()
    )


@pytest.mark.parametrize("classes", [[], [10], [-1], [1, 1], [True]])
def test_bad_classes_name_the_field(classes: list) -> None:
    with pytest.raises(UsageError, match="data\\.classes"):
        ImageDataModule(source="mnist-5k", classes=classes)

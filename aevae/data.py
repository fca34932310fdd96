"""One DataModule for every model: images held in memory as uint8, batches are index slices, floats per batch."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import lightning.pytorch as pl
import numpy as np
import torch
from torch.utils.data import DataLoader

from aevae import sources
from aevae.batches import (
    Batch,
    BatchRun,
    IndexBatches,
    InMemoryImages,
    device_placement,
    keep_batch,
    to_float,
    whole_epochs,
)
from aevae.builtin_sources import SOURCES, default_data_root, load_idx_source, load_mnist_5k
from aevae.errors import UsageError


def check_source(source: str) -> None:
    """A source names a built-in set, a torchvision class, ``folder:PATH`` or ``npz:PATH`` (paths are read in setup)."""
    for prefix in (sources.FOLDER_PREFIX, sources.NPZ_PREFIX):
        if source.startswith(prefix) and not source[len(prefix) :].strip():
            raise UsageError(f"data.source: {prefix}PATH needs a path, got {source!r}")
    if source in SOURCES or source.startswith((sources.FOLDER_PREFIX, sources.NPZ_PREFIX)):
        return
    if sources.torchvision_class(source) is None:
        raise UsageError(
            f"data.source: unknown source {source!r}; choose one of {', '.join(SOURCES)}, a torchvision data set "
            "class (CIFAR10, SVHN, CelebA, ...), folder:PATH or npz:PATH"
        )


def check_classes(classes: list[int] | None) -> None:
    """data.classes: None, or distinct labels 0..9 that keep at least one class."""
    if classes is None:
        return
    if not classes or any(not isinstance(c, int) or isinstance(c, bool) or not 0 <= c <= 9 for c in classes):
        raise UsageError(f"data.classes must be a non-empty list of labels in 0..9, got {classes}")
    if len(set(classes)) != len(classes):
        raise UsageError(f"data.classes lists a label twice: {classes}")


def keep_classes(
    images: torch.Tensor, labels: torch.Tensor, classes: list[int], split: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """Only the images whose label is in classes."""
    keep = torch.isin(labels, torch.tensor(classes, dtype=labels.dtype))
    if not keep.any():
        raise UsageError(f"data.classes: no {split} image has a label in {classes}")
    return images[keep], labels[keep]


class ImageDataModule(pl.LightningDataModule):
    """Images of any size and channel count, held in memory as uint8, with a seeded validation split.

    Args:
        source: ``mnist``, ``fashion-mnist``, ``mnist-5k`` (built in); a torchvision image data set class name
            (``CIFAR10``, ``CIFAR100``, ``SVHN``, ``CelebA``, ``KMNIST``, ...); ``folder:PATH`` (one sub-folder
            per class gives labels, image files directly in PATH are unlabelled); or ``npz:PATH`` (arrays
            ``images`` uint8 [N, H, W] or [N, H, W, C] and optional integer ``labels`` [N]). Unlabelled images
            get the label -1.
        root: data folder in torchvision's layout (``<root>/MNIST/raw/*.gz``, ``<root>/cifar-10-batches-py``);
            default ``$AEVAE_DATA_ROOT`` or ``data``.
        download: fetch a torchvision data set when its files are missing (needs network).
        image_size: resize the shorter side to this and centre-crop a square (None: keep the data's size, which
            must then be the same for every image).
        train_split: a torchvision data set's split trained on (its own name: ``train``; SVHN also ``extra``).
        test_split: its split tested on (``test``; CelebA ``test`` or ``valid``).
        dataset_options: more arguments of the torchvision class, e.g. ``{split: balanced}`` for EMNIST.
        test_fraction: folders and .npz have no test split: this seeded share of their images is held out.
        batch_size: images per batch (per device under DDP).
        val_fraction: share of the training images held out for validation, with ``split_seed``.
        split_seed: seed of the train/validation (and, for mnist-5k, folders and .npz, train/test) split.
        binarize: sample binary pixels: per batch in training, once (seeded) for val/test.
        num_workers: DataLoader workers; 0 keeps everything in the main process (fastest in memory).
        on_device: keep the splits on the training accelerator, so a batch is a gather there and no
            per-step copy happens: ``auto`` (on a single accelerator when they take at most half its free
            memory), ``true`` (refused when they cannot fit; under DDP each rank holds its shard) or ``false``.
            CPU training is unaffected.
        classes: class labels to keep in every split (e.g. digits 0-8, holding 9 out); None keeps all.
    """

    def __init__(
        self,
        source: str = "mnist-5k",
        root: str | None = None,
        download: bool = False,
        image_size: int | None = None,
        train_split: str = "train",
        test_split: str = "test",
        dataset_options: dict[str, Any] | None = None,
        test_fraction: float = 0.1,
        batch_size: int = 128,
        val_fraction: float = 0.1,
        split_seed: int = 0,
        binarize: bool = False,
        num_workers: int = 0,
        on_device: bool | Literal["auto"] = "auto",
        classes: list[int] | None = None,
    ) -> None:
        super().__init__()
        check_source(source)
        if image_size is not None and not 1 <= image_size <= 65536:
            raise UsageError(f"data.image_size must be in 1..65536, got {image_size}")
        if not 0.0 < test_fraction < 1.0:
            raise UsageError(f"data.test_fraction must be in (0, 1), got {test_fraction}")
        if batch_size < 1:
            raise UsageError(f"data.batch_size must be >= 1, got {batch_size}")
        if not 0.0 < val_fraction < 1.0:
            raise UsageError(f"data.val_fraction must be in (0, 1), got {val_fraction}")
        if num_workers < 0:
            raise UsageError(f"data.num_workers must be >= 0, got {num_workers}")
        if on_device not in (True, False, "auto"):
            raise UsageError(f"data.on_device: choose auto, true or false, got {on_device!r}")
        if on_device is True and num_workers > 0:
            raise UsageError("data.on_device: true keeps batches on the device; it takes data.num_workers 0")
        check_classes(classes)
        self.save_hyperparameters()
        self.source = source
        self.root = Path(root) if root else default_data_root()
        self.download = download
        self.image_size = image_size
        self.torchvision_splits = {"train": train_split, "test": test_split}
        self.dataset_options = dict(dataset_options or {})
        self.test_fraction = test_fraction
        self.batch_size = batch_size
        self.val_fraction = val_fraction
        self.split_seed = split_seed
        self.binarize = binarize
        self.num_workers = num_workers
        self.on_device = on_device
        self.splits: dict[str, InMemoryImages] = {}  # on the host, whole
        self.batches_from: dict[str, InMemoryImages] = {}  # where batches are cut: the host splits, or on a device
        self.placed_on: tuple[torch.device, int, int] | None = None  # (device, world size, rank) of batches_from
        self.steps_per_call = 1  # batches a Lightning step takes (fit.steps_per_call, set by the trainer factory)
        self.classes = None if classes is None else sorted(classes)

    def prepare_data(self) -> None:
        if not self.download:
            return
        if self.source in ("mnist", "fashion-mnist"):
            load_idx_source(self.source, self.root, download=True)
        elif sources.torchvision_class(self.source) is not None:
            for split in self.torchvision_splits.values():
                sources.open_torchvision(self.source, self.root, split, True, self.dataset_options)

    def read_source(self) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """train and test of the source: images uint8 [N, C, H, W] at data.image_size, labels int64 (-1: none)."""
        self.prepare_data()  # setup runs before fit (a missing file must fail before any run): download here
        if self.source.startswith(sources.FOLDER_PREFIX):
            path = Path(self.source[len(sources.FOLDER_PREFIX) :]).expanduser()
            return sources.split_off_test(sources.load_folder(path, self.image_size), self.test_fraction, self.split_seed)
        if self.source.startswith(sources.NPZ_PREFIX):
            path = Path(self.source[len(sources.NPZ_PREFIX) :]).expanduser()
            return sources.split_off_test(sources.load_npz(path, self.image_size), self.test_fraction, self.split_seed)
        if self.source not in SOURCES:
            return sources.load_torchvision(
                self.source, self.root, self.torchvision_splits, False, self.dataset_options, self.image_size
            )
        if self.source == "mnist-5k":
            arrays = load_mnist_5k(test_size=1000, seed=self.split_seed)
        else:
            arrays = load_idx_source(self.source, self.root, download=False)
        loaded = {}
        for split, (images, labels) in arrays.items():
            tensor = sources.as_nchw(images.copy(), f"data.source={self.source}")  # IDX buffers are read-only
            if self.image_size is not None:
                sources.check_fits(len(tensor), (1, self.image_size, self.image_size), f"data.source={self.source}")
                tensor = sources.resize(tensor, self.image_size)
            loaded[split] = (tensor, torch.from_numpy(labels.copy()))
        return loaded

    def setup(self, stage: str | None = None) -> None:
        if not self.splits:
            self.load()
        if self.trainer is not None:
            strategy = self.trainer.strategy
            self.place(strategy.root_device, self.trainer.world_size, self.trainer.global_rank)

    def load(self) -> None:
        """Read the data set into host memory and make the train/val/test splits."""
        arrays = self.read_source()
        if self.classes is not None:
            arrays = {split: keep_classes(*pair, self.classes, split) for split, pair in arrays.items()}
        train_images, train_labels = arrays["train"]
        order = torch.from_numpy(np.random.default_rng(self.split_seed).permutation(len(train_images)))
        n_val = max(1, round(self.val_fraction * len(order)))
        if n_val >= len(order):
            raise UsageError(f"data.val_fraction: {len(order)} training images leave none to train on")
        index = {"val": order[:n_val], "train": order[n_val:]}
        self.splits = {
            "train": self._tensors(train_images[index["train"]], train_labels[index["train"]], binarize_seed=None),
            "val": self._tensors(train_images[index["val"]], train_labels[index["val"]], binarize_seed=1),
            "test": self._tensors(*arrays["test"], binarize_seed=2),
        }

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """(channels, height, width) of the images (reading the data if not yet read)."""
        if not self.splits:
            self.load()
        return tuple(self.splits["train"].images.shape[1:])

    @property
    def labelled(self) -> bool:
        """Whether every image of every split has a class label (unlabelled images carry -1)."""
        if not self.splits:
            self.load()
        return all(bool((split.labels >= 0).all()) for split in self.splits.values())

    def _tensors(self, images: torch.Tensor, labels: torch.Tensor, binarize_seed: int | None) -> InMemoryImages:
        """uint8 images as they are; binarized val/test images are sampled once, seeded, and kept as 0 or 255."""
        if self.binarize and binarize_seed is not None:
            generator = torch.Generator().manual_seed(self.split_seed * 1000 + binarize_seed)
            chunks = [torch.bernoulli(chunk.float() / 255.0, generator=generator) for chunk in images.split(4096)]
            images = torch.cat(chunks).to(torch.uint8).mul_(255)
        return InMemoryImages(images.contiguous(), labels.contiguous())

    def goes_on_device(self, device: torch.device, world_size: int = 1) -> bool:
        """Whether batches are cut on the training device; a data.on_device=true that cannot fit is a UsageError
        (training calls this before any run exists)."""
        need = sum(split.nbytes() for split in self.splits.values()) // world_size
        free = torch.cuda.mem_get_info(device)[0] if device.type == "cuda" else None
        return device_placement(self.resolved_on_device(), device, world_size, need, free)

    def place(self, device: torch.device, world_size: int = 1, rank: int = 0) -> None:
        """Put the splits where batches are cut, once: the host splits, or copies on the training device (each
        rank's shard only under DDP)."""
        if self.placed_on == (device, world_size, rank):
            return
        if self.goes_on_device(device, world_size):
            self.batches_from = {name: self._shard(split, name, world_size, rank).to(device) for name, split in self.splits.items()}
        else:
            self.batches_from = self.splits
        self.placed_on = (device, world_size, rank)

    def resolved_on_device(self) -> str:
        return {True: "true", False: "false"}.get(self.on_device, "auto")  # type: ignore[arg-type]

    def _shard(self, split: InMemoryImages, name: str, world_size: int, rank: int) -> InMemoryImages:
        """A rank's disjoint share of a split (train: of a seeded permutation); epoch sums add up over ranks."""
        if world_size == 1:
            return split
        order = torch.randperm(len(split), generator=torch.Generator().manual_seed(self.split_seed))
        index = order[rank::world_size] if name == "train" else torch.arange(rank, len(split), world_size)
        return InMemoryImages(split.images[index], split.labels[index])

    def _loader(self, split: str, shuffle: bool) -> IndexBatches | DataLoader:
        data = self.batches_from.get(split, self.splits[split])
        distributed = self.trainer is not None and self.trainer.world_size > 1
        on_device = data is not self.splits[split]
        if self.cut_in_memory(on_device, distributed):
            return IndexBatches(data, self.batch_size, shuffle, self.runs_of(split))
        # Workers, or DDP over host data: a DataLoader, so that Lightning can shard it with its distributed sampler.
        return DataLoader(
            data,
            batch_size=self.batch_size,
            shuffle=shuffle,
            sampler=self._unrepeated(data) if distributed and not shuffle else None,
            collate_fn=keep_batch,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
        )

    def runs_of(self, split: str) -> int:
        """Batches one Lightning step takes from split: fit.steps_per_call, for val and test too unless the trainer
        limits that split by a count of batches (Lightning would count runs)."""
        limit = getattr(self.trainer, f"limit_{split}_batches", None) if split != "train" else None
        return self.steps_per_call if whole_epochs(limit) else 1

    def cut_in_memory(self, on_device: bool, distributed: bool) -> bool:
        """Whether batches are gathered from the in-memory split (IndexBatches), not by a DataLoader."""
        return on_device or (self.num_workers == 0 and not distributed)

    def _unrepeated(self, data: InMemoryImages) -> Any:
        """val/test shards under DDP that hold each image once. Lightning's DistributedSampler would pad a split
        that does not divide by the world size with repeated images, and every val/test mean would count them.
        Ranks may then run one batch fewer; that is safe, since evaluation syncs no DDP buffers after its first
        batch and the epoch sums meet only at the epoch's end."""
        from lightning.pytorch.overrides.distributed import UnrepeatedDistributedSampler

        return UnrepeatedDistributedSampler(data, self.trainer.world_size, self.trainer.global_rank, shuffle=False)

    def train_dataloader(self) -> IndexBatches | DataLoader:
        return self._loader("train", shuffle=True)

    def val_dataloader(self) -> IndexBatches | DataLoader:
        return self._loader("val", shuffle=False)

    def test_dataloader(self) -> IndexBatches | DataLoader:
        return self._loader("test", shuffle=False)

    def split_dataloader(self, split: str, batch_size: int = 1000) -> DataLoader:
        """A plain, unsharded loader over a whole split (for analysis after training)."""
        return DataLoader(self.splits[split], batch_size=batch_size, shuffle=False, collate_fn=keep_batch)

    def transfer_batch_to_device(self, batch: Any, device: torch.device, dataloader_idx: int) -> Any:
        if isinstance(batch, BatchRun):
            return batch.map(lambda one: self.transfer_batch_to_device(one, device, dataloader_idx))
        if all(t.device == device for t in batch):  # batches cut on the device, or CPU training: nothing to move
            return batch
        return super().transfer_batch_to_device(batch, device, dataloader_idx)

    def on_after_batch_transfer(self, batch: Batch | BatchRun, dataloader_idx: int) -> Batch | BatchRun:
        if isinstance(batch, BatchRun):
            return batch.prepared_by(self.prepare)  # each batch when the step reaches it
        return self.prepare(batch)

    def prepare(self, batch: Batch) -> Batch:
        """A batch as the model takes it: floats in [0, 1] (on the device that trains: a quarter of the bytes cross
        to it), binarized by a fresh draw in training."""
        images, labels = batch
        images = to_float(images)
        if self.binarize and self.trainer is not None and self.trainer.training:
            images = torch.bernoulli(images)
        return images, labels

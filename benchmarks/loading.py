"""Loading time: 50,000 32x32x3 images into memory (uint8 [N, C, H, W]) from an .npz and from CIFAR-10's format.

Writes both into a temporary folder (random pixels, the same sizes as CIFAR-10's training set plus its 10,000
test images), then times `ImageDataModule.setup()` (read, convert, split) for each, best of --repeats.
CIFAR-10's files are read by torchvision's CIFAR10 class, its MD5 check included: the class is given the
checksums of the generated files, so the check costs what it costs on the real files.

    python benchmarks/loading.py
"""

from __future__ import annotations

import argparse
import hashlib
import pickle
import tempfile
import time
from pathlib import Path

import numpy as np

from aevae.data import ImageDataModule

TRAIN, TEST = 50_000, 10_000


def write_npz(path: Path, rng: np.random.Generator) -> None:
    np.savez(path, images=rng.integers(0, 256, (TRAIN, 32, 32, 3), dtype=np.uint8), labels=rng.integers(0, 10, TRAIN))


def write_cifar10(root: Path, rng: np.random.Generator) -> None:
    """CIFAR-10's python layout, and torchvision's CIFAR10 class told the MD5 sums of these files."""
    from torchvision.datasets import CIFAR10

    folder = root / CIFAR10.base_folder
    folder.mkdir(parents=True)
    names = [*(f"data_batch_{i}" for i in range(1, 6)), "test_batch"]
    for name in names:
        data = rng.integers(0, 256, (TRAIN // 5 if name != "test_batch" else TEST, 3072), dtype=np.uint8)
        batch = {"batch_label": name, "labels": rng.integers(0, 10, len(data)).tolist(), "data": data}
        (folder / name).write_bytes(pickle.dumps(batch, protocol=4))
    (folder / "batches.meta").write_bytes(pickle.dumps({"label_names": [str(i) for i in range(10)]}))
    md5 = {name: hashlib.md5((folder / name).read_bytes()).hexdigest() for name in [*names, "batches.meta"]}
    CIFAR10.train_list = [[name, md5[name]] for name in names[:5]]
    CIFAR10.test_list = [["test_batch", md5["test_batch"]]]
    CIFAR10.meta = {**CIFAR10.meta, "md5": md5["batches.meta"]}


def time_setup(repeats: int, **options: str) -> float:
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        data = ImageDataModule(**options)
        data.setup()
        best = min(best, time.perf_counter() - start)
        assert data.image_shape == (3, 32, 32)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory() as folder:
        root = Path(folder)
        write_npz(root / "images.npz", rng)
        write_cifar10(root, rng)
        npz = time_setup(args.repeats, source=f"npz:{root / 'images.npz'}")
        cifar = time_setup(args.repeats, source="CIFAR10", root=str(root))
    print(f"npz, {TRAIN:,} images 32x32x3:               {npz:5.2f} s (best of {args.repeats})")
    print(f"CIFAR10 format, {TRAIN:,} + {TEST:,} images: {cifar:5.2f} s (best of {args.repeats})")


if __name__ == "__main__":
    main()

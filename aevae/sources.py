"""Where images come from: any torchvision image data set, an image folder, or .npz arrays, as uint8 tensors.

Every loader returns ``{split: (images, labels)}`` with images uint8 [N, C, H, W] and labels int64 [N]
(-1 where the data carry no class label). `resize` sizes them for the network; `check_fits` refuses, in one
line, a data set that would not fit in memory.
"""

from __future__ import annotations

import inspect
import os
import pickle
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from aevae.errors import UsageError

Split = tuple[torch.Tensor, torch.Tensor]  # images uint8 [N, C, H, W], labels int64 [N] (-1: unlabelled)
UNLABELLED = -1
FOLDER_PREFIX, NPZ_PREFIX = "folder:", "npz:"
CHUNK = 2048  # images decoded or resized at a time: batched, but bounded in memory
MEMORY_SHARE = 0.8  # of the memory available now, the most the images may take


def torchvision_class(name: str) -> type | None:
    """The torchvision data set class of that name (CIFAR10, SVHN, CelebA, ...), or None."""
    from torchvision import datasets

    found = getattr(datasets, name, None)
    return found if isinstance(found, type) and issubclass(found, datasets.VisionDataset) else None


def available_memory() -> int:
    """Bytes of memory available now (Linux), or all physical memory where that is unknown."""
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError):
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def check_fits(count: int, shape: tuple[int, ...], where: str) -> None:
    """Refuse images that would not fit in memory, before they are read or resized."""
    need = count * int(np.prod(shape))
    have = available_memory()
    if need > MEMORY_SHARE * have:
        size = "x".join(map(str, shape))
        raise UsageError(
            f"{where}: {count:,} images of {size} need {need / 2**30:.1f} GiB in memory as uint8; "
            f"{have / 2**30:.1f} GiB are available (use a smaller data.image_size or a subset)"
        )


def as_nchw(array: np.ndarray | torch.Tensor, where: str) -> torch.Tensor:
    """uint8 images [N, H, W], [N, H, W, C] or [N, C, H, W] (C in 1, 3, 4) as a contiguous [N, C, H, W] tensor."""
    images = torch.as_tensor(np.asarray(array))
    if images.dtype != torch.uint8:
        raise UsageError(f"{where}: images must be uint8 (0..255), got {images.dtype}")
    if images.ndim == 3:
        return images.unsqueeze(1).contiguous()
    if images.ndim != 4:
        raise UsageError(f"{where}: images must be [N, H, W] or [N, H, W, C], got shape {tuple(images.shape)}")
    if images.shape[-1] in (1, 3, 4):  # channels last: numpy, PIL, CIFAR
        return images.permute(0, 3, 1, 2).contiguous()
    if images.shape[1] in (1, 3, 4):  # channels first: SVHN's .mat arrays
        return images.contiguous()
    raise UsageError(f"{where}: images [N, H, W, C] need 1, 3 or 4 channels, got shape {tuple(images.shape)}")


def labels_or_unlabelled(labels: Any, count: int) -> torch.Tensor:
    """Class labels as int64, or -1 for every image where there are none (or they are not class indices)."""
    if labels is None:
        return torch.full((count,), UNLABELLED, dtype=torch.int64)
    array = np.asarray(labels)
    if array.ndim != 1 or len(array) != count or not np.issubdtype(array.dtype, np.integer):
        return torch.full((count,), UNLABELLED, dtype=torch.int64)
    return torch.from_numpy(array.astype(np.int64))


# --- resizing --------------------------------------------------------------------------------


def resize(images: torch.Tensor, size: int) -> torch.Tensor:
    """Shorter side to `size` (antialiased), then the centre size x size crop; uint8 in, uint8 out, in chunks."""
    from torchvision.transforms import v2

    if images.shape[-2:] == (size, size):
        return images
    transform = v2.Compose([v2.Resize(size, antialias=True), v2.CenterCrop(size)])
    return torch.cat([transform(chunk) for chunk in images.split(CHUNK)])


def resized_shape(shape: tuple[int, int, int], size: int | None) -> tuple[int, int, int]:
    return shape if size is None else (shape[0], size, size)


# --- torchvision data sets -------------------------------------------------------------------


def split_arguments(dataset_cls: type, split: str) -> dict[str, Any]:
    """A split name as the class takes it: ``split=...`` (SVHN, CelebA) or ``train=`` (CIFAR, MNIST, EMNIST)."""
    parameters = inspect.signature(dataset_cls.__init__).parameters
    if "train" in parameters:
        if split not in ("train", "test"):
            raise UsageError(f"data.splits: {dataset_cls.__name__} has the splits train and test, got {split!r}")
        return {"train": split == "train"}
    if "split" in parameters:
        return {"split": split}
    raise UsageError(f"data.source: {dataset_cls.__name__} takes no train/test split; use a folder: or npz: source")


def open_torchvision(name: str, root: Path, split: str, download: bool, options: dict[str, Any]) -> Any:
    """The torchvision data set object of one split, with torchvision's own error turned into one line."""
    dataset_cls = torchvision_class(name)
    if dataset_cls is None:
        raise UsageError(f"data.source: {name!r} is not a torchvision image data set class")
    try:
        return dataset_cls(str(root), download=download, **split_arguments(dataset_cls, split), **options)
    except UsageError:
        raise
    except (RuntimeError, OSError, ValueError, TypeError, EOFError, KeyError, pickle.UnpicklingError) as err:
        reason = (str(err).strip().splitlines() or [type(err).__name__])[0][:200]
        raise UsageError(
            f"data.source={name}: split {split!r} under {root} could not be read ({reason}); "
            "set data.root, or data.download true with network"
        ) from err


def array_images(dataset: Any) -> tuple[Any, Any] | None:
    """The images and labels a torchvision data set already holds as one array (CIFAR, MNIST, SVHN), or None."""
    data = getattr(dataset, "data", None)
    if not isinstance(data, (np.ndarray, torch.Tensor)) or len(data) != len(dataset) or data.ndim not in (3, 4):
        return None
    labels = next((getattr(dataset, key) for key in ("targets", "labels") if getattr(dataset, key, None) is not None), None)
    return data, labels


def decoded_images(dataset: Any, size: int | None, where: str) -> Split:
    """Images of a file-backed data set (CelebA, ...), decoded one by one and resized a chunk at a time."""
    first, _ = dataset[0]
    grey = getattr(first, "mode", "RGB") in ("1", "L")
    shape = (1 if grey else 3, first.height, first.width)
    check_fits(len(dataset), resized_shape(shape, size), where)
    chunks, labels = [], []
    for start in range(0, len(dataset), CHUNK):
        items = [dataset[i] for i in range(start, min(start + CHUNK, len(dataset)))]
        arrays = [np.asarray(image.convert("L" if grey else "RGB")) for image, _ in items]
        chunk = as_nchw(np.stack(arrays), where)
        chunks.append(chunk if size is None else resize(chunk, size))
        labels += [target if isinstance(target, int) else UNLABELLED for _, target in items]
    return torch.cat(chunks), torch.tensor(labels, dtype=torch.int64)


def load_torchvision(
    name: str, root: Path, splits: dict[str, str], download: bool, options: dict[str, Any], size: int | None
) -> dict[str, Split]:
    """train and test of a torchvision data set, under the split names the class uses."""
    loaded = {}
    for ours, theirs in splits.items():
        dataset = open_torchvision(name, root, theirs, download, options)
        where = f"data.source={name} ({theirs})"
        held = array_images(dataset)
        if held is None:
            loaded[ours] = decoded_images(dataset, size, where)
            continue
        images = as_nchw(held[0], where)
        check_fits(len(images), resized_shape(tuple(images.shape[1:]), size), where)
        loaded[ours] = (images if size is None else resize(images, size), labels_or_unlabelled(held[1], len(images)))
    return loaded


# --- folders of image files ---------------------------------------------------------------------


def folder_files(folder: Path) -> tuple[list[tuple[Path, int]], bool]:
    """(file, class index) of every image: ImageFolder's layout (one sub-folder per class, sorted by name) gives
    labels; image files directly in the folder are unlabelled. Returns the files and whether they are labelled."""
    from torchvision.datasets.folder import IMG_EXTENSIONS, find_classes, make_dataset

    where = f"data.source=folder:{folder}"
    if not folder.is_dir():
        raise UsageError(f"{where}: no such folder")
    if any(child.is_dir() for child in folder.iterdir()):
        try:
            _, class_index = find_classes(str(folder))
            samples = make_dataset(str(folder), class_index, extensions=IMG_EXTENSIONS)
        except FileNotFoundError as err:  # a class folder without images
            raise UsageError(f"{where}: {str(err).splitlines()[0]}") from err
        return [(Path(path), label) for path, label in samples], True
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMG_EXTENSIONS)
    if not files:
        raise UsageError(f"{where}: no image files ({', '.join(IMG_EXTENSIONS[:4])}, ...) in the folder")
    return [(path, UNLABELLED) for path in files], False


def read_image(path: Path) -> np.ndarray:
    """One image file as uint8 [H, W] (grey) or [H, W, 3]; a file PIL cannot decode is a UsageError naming it."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as image:
            grey = image.mode in ("1", "L", "I;16", "I")
            return np.array(image.convert("L" if grey else "RGB"))  # a writable copy
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as err:
        raise UsageError(f"data.source: image file {path} is corrupt or not an image ({type(err).__name__})") from err


def stack_images(arrays: list[np.ndarray], paths: list[Path], size: int | None, where: str) -> torch.Tensor:
    """Stack decoded images into [N, C, H, W]; grey ones become RGB when any is colour; sizes must agree
    unless data.image_size resizes them."""
    colour = any(array.ndim == 3 for array in arrays)
    channels_last = [np.repeat(a[..., None], 3 if colour else 1, -1) if a.ndim == 2 else a for a in arrays]
    tensors = [as_nchw(a[None], where)[0] for a in channels_last]
    if size is not None:
        return torch.stack([resize(t[None], size)[0] for t in tensors])
    shapes = {tuple(t.shape[1:]): path for t, path in zip(tensors, paths)}
    if len(shapes) > 1:
        (a, first), (b, second) = list(shapes.items())[:2]
        raise UsageError(
            f"data.image_size: {where} has images of different sizes ({a[0]}x{a[1]} in {first.name}, "
            f"{b[0]}x{b[1]} in {second.name}); set data.image_size to resize them"
        )
    return torch.stack(tensors)


def load_folder(folder: Path, size: int | None) -> Split:
    """Every image under the folder (see `folder_files`), decoded into memory."""
    where = f"data.source=folder:{folder}"
    files, _ = folder_files(folder)
    first = read_image(files[0][0])
    check_fits(len(files), resized_shape((3 if first.ndim == 3 else 1, *first.shape[:2]), size), where)
    paths = [path for path, _ in files]
    images = stack_images([read_image(path) for path in paths], paths, size, where)
    return images, torch.tensor([label for _, label in files], dtype=torch.int64)


# --- .npz arrays -----------------------------------------------------------------------------------


def load_npz(path: Path, size: int | None) -> Split:
    """``images`` (uint8 [N, H, W] or [N, H, W, C]) and optional ``labels`` ([N] integers) of an .npz file."""
    where = f"data.source=npz:{path}"
    if not path.is_file():
        raise UsageError(f"{where}: no such file")
    try:
        with np.load(path, allow_pickle=False) as arrays:
            if "images" not in arrays:
                raise UsageError(f"{where}: no array named 'images' (found {', '.join(arrays.files) or 'none'})")
            images = as_nchw(arrays["images"], where)
            labels = arrays["labels"] if "labels" in arrays else None
    except UsageError:
        raise
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as err:
        raise UsageError(f"{where}: not a readable .npz file ({type(err).__name__}: {str(err)[:120]})") from err
    if len(images) == 0:
        raise UsageError(f"{where}: 'images' holds no images")
    if labels is not None and (labels.ndim != 1 or len(labels) != len(images)):
        raise UsageError(f"{where}: 'labels' must be [N] = [{len(images)}], got shape {labels.shape}")
    check_fits(len(images), resized_shape(tuple(images.shape[1:]), size), where)
    return (images if size is None else resize(images, size)), labels_or_unlabelled(labels, len(images))


def split_off_test(data: Split, test_fraction: float, seed: int) -> dict[str, Split]:
    """A seeded test split for sources that come as one set of images (folders, .npz)."""
    images, labels = data
    if len(images) < 3:
        raise UsageError(f"data.source: {len(images)} images are too few for train, validation and test splits")
    order = torch.from_numpy(np.random.default_rng(seed).permutation(len(images)))
    n_test = max(1, round(test_fraction * len(images)))
    test, train = order[:n_test], order[n_test:]
    return {"train": (images[train], labels[train]), "test": (images[test], labels[test])}

"""Any image data: torchvision classes on files in their real on-disk format, image folders, .npz arrays;
networks sized to the data; colour likelihoods; bad data refused in one line with nothing written."""

from __future__ import annotations

import math
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from mlflow import MlflowClient
from PIL import Image

from aevae import analysis, sources
from aevae.data import ImageDataModule
from aevae.cli import main
from aevae.errors import UsageError
from aevae.likelihoods import DiscretizedLogistic, Gaussian, bits_per_dim
from aevae.models import VAE
from aevae.training import instantiate, parse_config, run_training
from conftest import REPO, run_aevae

DEMO = str(REPO / "experiments" / "vae_demo.yaml")
CONV_TINY = [
    "--model.init_args.architecture", "conv", "--model.init_args.hidden_dims", "[4, 8, 16]",
    "--trainer.max_epochs", "1", "--trainer.limit_train_batches", "2", "--data.batch_size", "16",
    "--analysis.umap", "false", "--analysis.sample_size", "50",
]  # fmt: skip


# --- data sets written in their own formats ------------------------------------------------------


def write_cifar10(root: Path, per_batch: int = 12, test: int = 20) -> dict[str, np.ndarray]:
    """CIFAR-10's python layout: five pickled training batches, a test batch and batches.meta."""
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    rows = {}
    for name, n in [*((f"data_batch_{i}", per_batch) for i in range(1, 6)), ("test_batch", test)]:
        data = rng.integers(0, 256, (n, 3072), dtype=np.uint8)
        labels = [int(label) for label in rng.integers(0, 10, n)]
        batch = {"batch_label": name, "labels": labels, "data": data, "filenames": [f"{i}.png" for i in range(n)]}
        (folder / name).write_bytes(pickle.dumps(batch))
        rows[name] = data
    meta = {"label_names": ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]}
    (folder / "batches.meta").write_bytes(pickle.dumps(meta))
    return rows


def idx_bytes(array: np.ndarray) -> bytes:
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(n.to_bytes(4, "big") for n in array.shape)
    return header + array.astype(np.uint8).tobytes()


def write_kmnist(root: Path, train: int = 60, test: int = 20) -> np.ndarray:
    """KMNIST as torchvision keeps it: uncompressed IDX files in <root>/KMNIST/raw (no checksum on load)."""
    raw = root / "KMNIST" / "raw"
    raw.mkdir(parents=True)
    rng = np.random.default_rng(1)
    images = rng.integers(0, 256, (train, 28, 28), dtype=np.uint8)
    for prefix, pictures in (("train", images), ("t10k", rng.integers(0, 256, (test, 28, 28), dtype=np.uint8))):
        (raw / f"{prefix}-images-idx3-ubyte").write_bytes(idx_bytes(pictures))
        (raw / f"{prefix}-labels-idx1-ubyte").write_bytes(idx_bytes(rng.integers(0, 10, len(pictures))))
    return images


def write_image_folder(folder: Path, per_class: int = 10, size: int = 32) -> dict[str, list[np.ndarray]]:
    """ImageFolder's layout: one sub-folder of RGB PNGs per class."""
    rng = np.random.default_rng(2)
    pictures: dict[str, list[np.ndarray]] = {}
    for name in ("cat", "car", "ant"):
        (folder / name).mkdir(parents=True)
        pictures[name] = [rng.integers(0, 256, (size, size, 3), dtype=np.uint8) for _ in range(per_class)]
        for i, picture in enumerate(pictures[name]):
            Image.fromarray(picture).save(folder / name / f"{i:03d}.png")
    return pictures


@pytest.fixture
def cifar_checksums_skipped(monkeypatch: pytest.MonkeyPatch) -> None:
    """torchvision checks CIFAR's files against the real data set's MD5 sums, which generated files cannot
    match; only that comparison is skipped, the files are read by torchvision's own CIFAR10 class."""
    from torchvision.datasets import CIFAR10, cifar

    monkeypatch.setattr(CIFAR10, "_check_integrity", lambda self: True)
    monkeypatch.setattr(cifar, "check_integrity", lambda *args, **kwargs: True)


# --- loading ------------------------------------------------------------------------------------------


def test_cifar10_batches_load_through_torchvision_as_uint8_nchw(tmp_path: Path, cifar_checksums_skipped: None) -> None:
    rows = write_cifar10(tmp_path)
    loaded = ImageDataModule(source="CIFAR10", root=str(tmp_path)).read_source()
    images, labels = loaded["train"]
    assert images.dtype == torch.uint8 and images.shape == (60, 3, 32, 32)
    assert torch.equal(images[0], torch.from_numpy(rows["data_batch_1"][0].reshape(3, 32, 32)))  # R, G, B planes
    assert torch.equal(loaded["test"][0][-1], torch.from_numpy(rows["test_batch"][-1].reshape(3, 32, 32)))
    assert labels.dtype == torch.int64 and 0 <= labels.min() and labels.max() <= 9


def test_torchvision_class_with_its_own_split_names(tmp_path: Path) -> None:
    images = write_kmnist(tmp_path)
    data = ImageDataModule(source="KMNIST", root=str(tmp_path), val_fraction=0.25)
    loaded = data.read_source()
    assert torch.equal(loaded["train"][0][:, 0], torch.from_numpy(images))
    assert data.image_shape == (1, 28, 28) and len(data.splits["val"]) == 15 and len(data.splits["test"]) == 20
    with pytest.raises(UsageError, match="data.splits: KMNIST has the splits train and test, got 'extra'"):
        ImageDataModule(source="KMNIST", root=str(tmp_path), train_split="extra").read_source()


def test_image_folder_classes_become_labels_by_sorted_name(tmp_path: Path) -> None:
    pictures = write_image_folder(tmp_path / "pets")
    images, labels = sources.load_folder(tmp_path / "pets", size=None)
    assert images.shape == (30, 3, 32, 32) and labels.tolist() == [0] * 10 + [1] * 10 + [2] * 10  # ant, car, cat
    assert torch.equal(images[10], torch.from_numpy(pictures["car"][0]).permute(2, 0, 1))


def test_flat_folder_is_unlabelled_and_grey_stays_one_channel(tmp_path: Path) -> None:
    rng = np.random.default_rng(3)
    grey = [rng.integers(0, 256, (12, 10), dtype=np.uint8) for _ in range(6)]
    for i, picture in enumerate(grey):
        Image.fromarray(picture).save(tmp_path / f"{i}.png")
    data = ImageDataModule(source=f"folder:{tmp_path}", val_fraction=0.2, test_fraction=0.2)
    images, labels = sources.load_folder(tmp_path, size=None)
    assert images.shape == (6, 1, 12, 10) and torch.equal(images[2, 0], torch.from_numpy(grey[2]))
    assert labels.tolist() == [-1] * 6 and not data.labelled
    Image.fromarray(np.zeros((12, 10, 3), np.uint8)).save(tmp_path / "colour.png")
    assert sources.load_folder(tmp_path, size=None)[0].shape == (7, 3, 12, 10)  # grey ones repeated to RGB


def test_npz_layouts_labels_and_resize_with_centre_crop(tmp_path: Path) -> None:
    rng = np.random.default_rng(4)
    wide = rng.integers(0, 256, (5, 4, 8, 3), dtype=np.uint8)  # N, H, W, C
    np.savez(tmp_path / "wide.npz", images=wide, labels=np.arange(5))
    images, labels = sources.load_npz(tmp_path / "wide.npz", size=None)
    assert images.shape == (5, 3, 4, 8) and labels.tolist() == [0, 1, 2, 3, 4]
    cropped, _ = sources.load_npz(tmp_path / "wide.npz", size=4)  # shorter side already 4: only the crop
    assert torch.equal(cropped, torch.from_numpy(wide[:, :, 2:6]).permute(0, 3, 1, 2))
    halved, _ = sources.load_npz(tmp_path / "wide.npz", size=2)
    assert halved.shape == (5, 3, 2, 2) and halved.dtype == torch.uint8
    np.savez(tmp_path / "grey.npz", images=wide[..., 0])  # N, H, W, no labels
    grey, unlabelled = sources.load_npz(tmp_path / "grey.npz", size=None)
    assert grey.shape == (5, 1, 4, 8) and unlabelled.tolist() == [-1] * 5


def test_data_too_large_for_memory_is_one_line_with_the_sizes(tmp_path: Path) -> None:
    np.savez(tmp_path / "few.npz", images=np.zeros((10, 8, 8, 3), np.uint8))
    with pytest.raises(UsageError, match=r"10 images of 3x60000x60000 need 100.6 GiB in memory") as raised:
        sources.load_npz(tmp_path / "few.npz", size=60000)
    assert len(str(raised.value).splitlines()) == 1


# --- networks and likelihoods ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("shape", "hidden", "feature_map"),
    [((1, 28, 28), [32, 64, 256], (7, 7)), ((3, 64, 64), [8, 8, 8, 8, 16], (4, 4)), ((3, 7, 9), [4, 8], (3, 4))],
)
def test_conv_stages_halve_to_a_small_map_and_the_decoder_restores_the_shape(shape, hidden, feature_map) -> None:
    vae = VAE(latent_dim=3, architecture="conv", hidden_dims=hidden, likelihood="logistic", image_shape=list(shape))
    dense = [module for module in vae.encoder if isinstance(module, torch.nn.Linear)][0]
    assert dense.in_features == hidden[-2] * feature_map[0] * feature_map[1]
    x = torch.rand(2, *shape)
    assert vae(x).recon_logits.shape == (2, 2 * shape[0], *shape[1:])  # a mean and a scale per channel
    assert vae.reconstruct(x).shape == (2, *shape)


def test_conv_stages_beyond_one_pixel_are_refused() -> None:
    with pytest.raises(UsageError, match="model.hidden_dims: 6 stride-2 conv stages halve a 28x28 image"):
        VAE(architecture="conv", hidden_dims=[4] * 6 + [8])


def test_discretized_logistic_is_a_distribution_over_256_levels() -> None:
    levels = torch.arange(256.0).view(256, 1, 1, 1) / 255
    for mean, log_scale in ((0.3, -1.0), (-0.9, -4.0), (1.5, 0.5)):
        params = torch.tensor([mean, log_scale]).view(1, 2, 1, 1).expand(256, 2, 1, 1)
        assert DiscretizedLogistic().log_prob(params, levels).exp().sum().item() == pytest.approx(1.0, abs=1e-4)


def test_gaussian_nll_and_bits_per_dim_exactly() -> None:
    x = torch.full((1, 3, 2, 2), 0.5)
    fixed = Gaussian(channels=3, scale=0.5)  # mean sigmoid(0) = 0.5 = x: only the normaliser is left
    assert fixed.nll(torch.zeros_like(x), x).item() == pytest.approx(12 * (math.log(0.5) + 0.5 * math.log(2 * math.pi)))
    learned = Gaussian(channels=3, learned=True)
    assert [p.shape for p in learned.parameters()] == [(3, 1, 1)]
    assert bits_per_dim(torch.tensor(12 * math.log(2) * 3.0), 12, DiscretizedLogistic()).item() == pytest.approx(3.0)
    assert bits_per_dim(torch.tensor(0.0), 12, fixed).item() == 8.0  # continuous density: + log2(256)


# --- a conv VAE trains on each source, and its run is complete ---------------------------------------


def source_for(kind: str, tmp_path: Path) -> list[str]:
    if kind == "CIFAR10":
        write_cifar10(tmp_path / "data")
        return ["--data.source", "CIFAR10", "--data.root", str(tmp_path / "data")]
    if kind == "KMNIST":
        write_kmnist(tmp_path / "data")
        return ["--data.source", "KMNIST", "--data.root", str(tmp_path / "data")]
    if kind == "folder":
        write_image_folder(tmp_path / "pets")
        return ["--data.source", f"folder:{tmp_path / 'pets'}", "--data.test_fraction", "0.3"]
    images = np.random.default_rng(5).integers(0, 256, (80, 32, 32, 3), dtype=np.uint8)
    np.savez(tmp_path / "pictures.npz", images=images)  # unlabelled
    return ["--data.source", f"npz:{tmp_path / 'pictures.npz'}"]


@pytest.mark.parametrize(("kind", "shape"), [("CIFAR10", [3, 32, 32]), ("KMNIST", [1, 28, 28]),
                                             ("folder", [3, 32, 32]), ("npz", [3, 32, 32])])  # fmt: skip
def test_conv_vae_trains_on_each_source_into_a_complete_run(
    kind: str, shape: list[int], tmp_path: Path, tracking_uri: str, cifar_checksums_skipped: None,
    monkeypatch: pytest.MonkeyPatch,
) -> None:  # fmt: skip
    monkeypatch.chdir(tmp_path)
    args = ["--config", DEMO, *CONV_TINY, *source_for(kind, tmp_path), "--tracking.uri", tracking_uri,
            "--model.init_args.likelihood", "logistic" if shape[0] == 3 else "bernoulli"]  # fmt: skip
    result = run_training(parse_config(args))
    run = MlflowClient(tracking_uri).get_run(result.run_id)
    assert run.info.status == "FINISHED" and run.data.params["data.source"] == args[args.index("--data.source") + 1]
    assert {"val/nelbo", "val/bpd", "test/bpd", "active_units"} <= set(run.data.metrics)
    assert run.data.metrics["test/bpd"] == pytest.approx(run.data.metrics["test/nelbo"] / (math.prod(shape) * math.log(2)))
    files = {item.path for item in MlflowClient(tracking_uri).list_artifacts(result.run_id, "latent")}
    assert {"latent/reconstructions.png", "latent/prior_samples.png", "latent/pca.png"} <= files
    labelled = kind != "npz"
    assert ("silhouette_pca" in run.data.metrics) == labelled
    assert ("analysis.skipped" in run.data.tags) == (not labelled)
    checkpoint = MlflowClient(tracking_uri).download_artifacts(result.run_id, "checkpoints/best.ckpt", str(tmp_path))
    reloaded = VAE.load_from_checkpoint(checkpoint, map_location="cpu")  # no data needed to rebuild it
    assert list(reloaded.image_shape) == shape and reloaded.reconstruct(torch.rand(2, *shape)).shape == (2, *shape)


# --- bad data: one line naming the field or path, exit 2, nothing written ---------------------------------


def bad_sources(tmp_path: Path) -> dict[str, tuple[str, str]]:
    """name -> (data.source, what the error line must contain)"""
    (tmp_path / "empty").mkdir()
    mixed = tmp_path / "mixed"
    mixed.mkdir()
    Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(mixed / "a.png")
    Image.fromarray(np.zeros((28, 30, 3), np.uint8)).save(mixed / "b.png")
    corrupt = tmp_path / "corrupt"
    (corrupt / "cats").mkdir(parents=True)
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(corrupt / "cats" / "good.png")
    (corrupt / "cats" / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    (tmp_path / "broken.npz").write_bytes(b"PK\x03\x04 truncated")
    return {
        "missing folder": (f"folder:{tmp_path / 'nowhere'}", f"folder:{tmp_path / 'nowhere'}: no such folder"),
        "empty folder": (f"folder:{tmp_path / 'empty'}", "no image files"),
        "mixed sizes": (f"folder:{mixed}", "data.image_size: "),
        "unknown class": ("CIFAR11", "data.source: unknown source 'CIFAR11'"),
        "corrupt image": (f"folder:{corrupt}", f"image file {corrupt / 'cats' / 'bad.png'} is corrupt"),
        "corrupt npz": (f"npz:{tmp_path / 'broken.npz'}", "not a readable .npz file"),
        "missing torchvision files": ("SVHN", "data.source=SVHN: split 'train' under"),
    }


def test_bad_data_is_one_line_exit_2_and_writes_nothing(
    tmp_path: Path, capfd: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    for name, (source, expected) in bad_sources(tmp_path).items():
        code = main(["train", "--config", DEMO, "--data.source", source, "--data.root", str(tmp_path / "none")])
        lines = capfd.readouterr().err.strip().splitlines()
        assert code == 2 and len(lines) == 1 and expected in lines[0], (name, lines)
        assert list(work.iterdir()) == [], name  # no mlruns/, no checkpoints/


def test_bad_data_through_the_cli_process(tmp_path: Path) -> None:
    done = run_aevae("train", "--config", DEMO, "--data.source", f"folder:{tmp_path / 'nowhere'}", cwd=tmp_path)
    assert done.returncode == 2 and done.stderr.strip() == (
        f"aevae train: error: data.source=folder:{tmp_path / 'nowhere'}: no such folder"
    )
    assert [path.name for path in tmp_path.iterdir()] == []


def test_the_28x28_conv_config_builds_the_earlier_two_stage_net() -> None:
    """[c1, c2, dense] on 28x28 keeps the layers (and so the checkpoints) of the fixed conv net it replaced."""
    shapes = {key: tuple(value.shape) for key, value in VAE(architecture="conv", hidden_dims=[8, 16, 32]).state_dict().items()}
    assert shapes == {
        "encoder.0.weight": (8, 1, 4, 4), "encoder.0.bias": (8,), "encoder.2.weight": (16, 8, 4, 4),
        "encoder.2.bias": (16,), "encoder.5.weight": (32, 16 * 7 * 7), "encoder.5.bias": (32,),
        "encoder.7.weight": (8, 32), "encoder.7.bias": (8,),
        "decoder.0.weight": (32, 4), "decoder.0.bias": (32,), "decoder.2.weight": (16 * 7 * 7, 32),
        "decoder.2.bias": (16 * 7 * 7,), "decoder.5.weight": (16, 8, 4, 4), "decoder.5.bias": (8,),
        "decoder.7.weight": (8, 1, 4, 4), "decoder.7.bias": (1,),
    }  # fmt: skip


def test_a_config_image_shape_must_match_the_data(tmp_path: Path) -> None:
    config = parse_config(["--config", DEMO, "--model.init_args.image_shape", "[3, 28, 28]"])
    with pytest.raises(UsageError, match=r"model.image_shape is \[3, 28, 28\], but data.source=mnist-5k gives \[1, 28, 28\]"):
        instantiate(config)
    model, _ = instantiate(parse_config(["--config", DEMO, "--data.image_size", "16"]))
    assert model.hparams.image_shape == [1, 16, 16]  # from the data, saved with the model


def test_label_scores_are_skipped_when_a_split_has_no_more_images_than_classes() -> None:
    assert analysis.label_problem(np.array([0, 1, 2]), "test") == "the test split has 3 images of 3 classes; silhouette needs more"
    assert analysis.label_problem(np.array([0, 1, 1]), "test") is None
    assert analysis.label_problem(np.array([-1, -1, -1]), "test") == analysis.NO_LABELS

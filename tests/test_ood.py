"""Out-of-distribution detection: metrics on hand cases, scores on known answers, `aevae ood` end to end, bad input."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from mlflow import MlflowClient

from aevae.ood import OodOptions, detect, other_data
from aevae.ood_metrics import auroc, aupr, detection_metrics, fpr_at_tpr
from aevae.ood_scores import LatentGaussian, png_bits, score_images
from aevae.training import parse_config, run_training
from conftest import aevae_here

pytestmark = pytest.mark.xdist_group("test_ood")  # `make test`: one worker runs this file, making `runs` once

REPO = Path(__file__).resolve().parents[1]


def tiny(kind: str) -> list[str]:
    return [
        "--config", str(REPO / "experiments" / f"{kind}_mnist.yaml"), "--data.source", "mnist-5k",
        "--trainer.accelerator", "cpu", "--model.init_args.hidden_dims", "[64]",
        "--trainer.max_epochs", "2", "--trainer.limit_train_batches", "10", "--trainer.enable_progress_bar", "false",
        "--trainer.enable_model_summary", "false", "--analysis.enabled", "false",
    ]  # fmt: skip


# --- metrics -------------------------------------------------------------------------------------------------


def test_identical_sets_give_auroc_one_half_and_separable_sets_one() -> None:
    scores = np.random.default_rng(0).normal(size=500)
    assert auroc(scores, scores) == 0.5
    assert auroc(scores, np.random.default_rng(1).normal(size=500)) == pytest.approx(0.5, abs=0.05)
    assert auroc(scores, scores + 100) == 1.0 and aupr(scores, scores + 100) == 1.0
    assert fpr_at_tpr(scores, scores + 100) == 0.0
    assert auroc(scores + 100, scores) == 0.0  # higher means "out": the orientation is not guessed


def test_fpr_at_95_tpr_and_auroc_on_a_hand_case() -> None:
    inside = np.array([1.0, 2.0, 3.0, 4.0])
    outside = np.r_[0.5, 2.5, np.arange(10.0, 28.0)]  # 20 OOD images: 18 high, one between, one low
    # Flagging 19 of 20 OOD images (TPR 0.95) needs the threshold at 2.5, which flags 3 and 4: FPR 2/4.
    assert fpr_at_tpr(inside, outside) == 0.5
    # Pairs (out > in): 18 * 4 + 2 (2.5 beats 1 and 2) + 0 = 74 of 80.
    assert auroc(inside, outside) == 74 / 80


def test_bootstrap_interval_covers_the_estimate_and_is_seeded() -> None:
    rng = np.random.default_rng(0)
    inside, outside = rng.normal(size=400), rng.normal(1.0, size=400)
    estimates = detection_metrics(inside, outside, bootstrap=400, seed=3)
    for estimate in estimates.values():
        assert estimate.low <= estimate.value <= estimate.high
        assert estimate.high - estimate.low > 0.005  # a real interval, not the point twice
    # Hanley & McNeil's standard error of this AUROC (0.76, 400 + 400) is 0.017: a 95% width of about 0.066.
    # Resampling only one of the two sets would give about 0.047.
    assert 0.055 < estimates["auroc"].high - estimates["auroc"].low < 0.08
    assert estimates["auroc"].value == auroc(inside, outside)
    assert 0.72 < estimates["auroc"].value < 0.80  # Phi(1 / sqrt 2) = 0.760 for unit Gaussians one apart
    assert detection_metrics(inside, outside, bootstrap=400, seed=3) == estimates


# --- scores --------------------------------------------------------------------------------------------------


def test_mahalanobis_distance_on_a_hand_case() -> None:
    codes = np.array([[1.0, 0.0], [-1.0, 0.0], [0.0, 2.0], [0.0, -2.0]])  # mean 0, covariance diag(0.5, 2)
    distances = LatentGaussian(codes).distance(np.array([[1.0, 0.0], [0.0, 2.0], [0.0, 0.0]]))
    assert np.allclose(distances, [math.sqrt(2), math.sqrt(2), 0.0])


def test_png_bits_are_lower_for_a_simpler_image() -> None:
    blank = torch.zeros(1, 1, 28, 28)
    noise = torch.rand(1, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    blank_bits, noise_bits = png_bits(torch.cat([blank, noise]))
    assert blank_bits < 1000 < 28 * 28 * 8 * 0.9 < noise_bits  # noise barely compresses


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """A tiny VAE and AE trained on mnist-5k, in one store."""
    uri = f"sqlite:///{tmp_path_factory.mktemp('store') / 'mlflow.db'}"
    results = {}
    for kind in ("vae", "ae"):
        config = parse_config([*tiny(kind), "--tracking.uri", uri, "--fit.checkpoint_dir",
                               str(tmp_path_factory.mktemp(f"ckpt_{kind}"))])  # fmt: skip
        results[kind] = run_training(config)
    return {"uri": uri, **results}


def test_same_images_score_alike_and_white_images_are_far_out(runs) -> None:
    vae = runs["vae"]
    data = vae.datamodule
    images = data.splits["test"].images[:200].float() / 255  # uint8 in memory
    latent = LatentGaussian(np.random.default_rng(0).normal(size=(100, 4)))
    names = ["recon", "nelbo", "iwae", "mahalanobis", "complexity"]
    first = score_images(vae.model, images, names, k=20, latent=latent, seed=0)
    again = score_images(vae.model, images, names, k=20, latent=latent, seed=0)
    white = score_images(vae.model, torch.ones_like(images), names, k=20, latent=latent, seed=1)
    for name in names:
        assert np.array_equal(first[name], again[name]), name  # seeded
        assert auroc(first[name], again[name]) == pytest.approx(0.5, abs=1e-12), name
    for name in ("recon", "nelbo", "iwae", "complexity"):
        assert auroc(first[name], white[name]) > 0.99, name
    assert np.mean(first["iwae"]) <= np.mean(first["nelbo"])  # the IWAE bound is the tighter one


def test_detect_scores_held_out_classes_of_the_same_source(runs) -> None:
    ae = runs["ae"]
    data = ae.datamodule
    data.classes = list(range(9))  # as if trained on 0-8: the held-out set is the digit 9
    other = other_data(data, "heldout")
    other.setup()
    assert set(other.splits["test"].labels.tolist()) == {9}
    result = detect(ae.model, data, other, OodOptions(against="heldout", bootstrap=5, max_images=150))
    assert set(result.metrics) == {"recon", "mahalanobis", "complexity"}  # an AE has no likelihood scores
    assert all(len(scores) == 150 for scores in result.in_scores.values())
    data.classes = None


def test_aevae_ood_logs_metrics_and_plots_into_the_run(runs, tmp_path: Path, monkeypatch, capfd) -> None:
    run_id, uri = runs["vae"].run_id, runs["uri"]
    monkeypatch.chdir(tmp_path)
    code, out, err = aevae_here(capfd, "ood", "--run-id", run_id, "--against", "fashion-mnist", "--k", "5",
                                "--max_images", "300", "--bootstrap", "20", "--tracking-uri", uri)  # fmt: skip
    assert code == 0, err
    assert "| iwae |" in out and "| complexity |" in out
    client = MlflowClient(uri)
    metrics = client.get_run(run_id).data.metrics
    for score in ("recon", "nelbo", "iwae", "mahalanobis", "complexity"):
        key = f"ood/fashion-mnist/{score}/auroc"
        assert metrics[f"{key}_low"] <= metrics[key] <= metrics[f"{key}_high"]
    logged = {item.path for item in client.list_artifacts(run_id, "ood/fashion-mnist")}
    assert {"ood/fashion-mnist/histograms.png", "ood/fashion-mnist/scores.npz"} <= logged


def bare_run(uri: str) -> str:
    client = MlflowClient(uri)
    return client.create_run(client.create_experiment("bare")).info.run_id


@pytest.mark.parametrize(
    "case, extra, message",
    [
        ("vae", ["--against", "cifar"], "against: unknown source 'cifar'"),
        ("vae", ["--against", "mnist-5k"], "against: the run was trained on mnist-5k"),
        ("vae", ["--against", "heldout"], "against: heldout needs a run trained with data.classes"),
        ("vae", ["--against", "mnist", "--k", "0"], "k: the number of importance samples must be >= 1"),
        ("ae", ["--against", "mnist", "--scores", "[nelbo]"], "scores: nelbo needs a VAE"),
        ("bare", ["--against", "mnist"], "has no config.yaml"),
    ],
)
def test_bad_ood_input_is_one_line_exit_2_and_writes_nothing(
    runs, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capfd: pytest.CaptureFixture, case, extra, message
) -> None:  # in this process, as tests/test_bad_input.py: capfd sees all a library writes to the terminal too
    uri = runs["uri"]
    run_id = bare_run(uri) if case == "bare" else runs[case].run_id
    client = MlflowClient(uri)
    before = (client.get_run(run_id).data.metrics, client.list_artifacts(run_id))
    monkeypatch.chdir(tmp_path)
    code, _, err = aevae_here(capfd, "ood", "--run-id", run_id, *extra, "--tracking-uri", uri)
    assert code == 2, err
    assert len(err.strip().splitlines()) == 1 and message in err, err
    assert (client.get_run(run_id).data.metrics, client.list_artifacts(run_id)) == before
    assert not list(tmp_path.iterdir())

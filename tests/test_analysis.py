"""Latent-space analysis: scores on known geometry, determinism, the record in MLflow, `aevae analyze`, bad input."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from mlflow import MlflowClient
from sklearn.metrics import silhouette_score

from aevae import analysis
from aevae.cli import main
from aevae.batches import InMemoryImages
from aevae.data import ImageDataModule
from aevae.models import VAE
from aevae.training import parse_config, run_training

pytestmark = pytest.mark.xdist_group("test_analysis")  # `make test`: one worker runs this file, making `trained` once

REPO = Path(__file__).resolve().parents[1]
TINY = [
    "--config", str(REPO / "experiments" / "vae_demo.yaml"), "--model.init_args.hidden_dims", "[32]",
    "--trainer.max_epochs", "2", "--trainer.limit_train_batches", "5", "--trainer.enable_progress_bar", "false",
    "--trainer.enable_model_summary", "false", "--analysis.sample_size", "400",
]  # fmt: skip


def blobs(n_per_class: int = 60, seed: int = 0, spread: float = 0.02) -> analysis.Codes:
    """Ten tight Gaussian blobs in 4-D, their centres on a circle in the first two dimensions."""
    rng = np.random.default_rng(seed)
    angles = np.arange(10) * 2 * np.pi / 10
    centres = np.stack([np.cos(angles), np.sin(angles), np.zeros(10), np.zeros(10)], 1) * 3
    labels = np.repeat(np.arange(10), n_per_class)
    z = centres[labels] + rng.normal(scale=spread, size=(len(labels), 4))
    return analysis.Codes(z.astype(np.float32), labels)


def test_separated_blobs_score_high_and_shuffled_labels_score_zero() -> None:
    codes = blobs()
    pca = analysis.pca_2d(codes.z, codes.labels)
    assert analysis.silhouette(codes.z, codes.labels) > 0.95
    assert analysis.silhouette(pca, codes.labels) > 0.95
    assert analysis.probe_scores(blobs(seed=1), codes) == {"knn_acc": 1.0, "probe_acc": 1.0}
    many = blobs(n_per_class=200)  # labels carrying no information score slightly below 0, less so for more points
    shuffled = np.random.default_rng(0).permutation(many.labels)
    assert abs(analysis.silhouette(many.z, shuffled)) < 0.06


def test_silhouette_is_sklearns_on_the_same_sample() -> None:
    codes = blobs(spread=1.0)
    index = analysis.sample_index(len(codes.labels), 250, seed=3)
    assert len(index) == 250 and len(set(index)) == 250
    expected = silhouette_score(codes.z[index], codes.labels[index])
    assert analysis.silhouette(codes.z, codes.labels, sample_size=250, seed=3) == pytest.approx(expected, abs=1e-12)
    assert analysis.silhouette(codes.z, codes.labels, sample_size=10_000) == pytest.approx(
        silhouette_score(codes.z, codes.labels), abs=1e-12
    )


def test_projections_are_seeded_and_oriented() -> None:
    codes = blobs(n_per_class=30)
    first, again = analysis.umap_2d(codes.z, codes.labels, seed=0), analysis.umap_2d(codes.z, codes.labels, seed=0)
    np.testing.assert_array_equal(first, again)
    assert analysis.silhouette(first, codes.labels) > 0.8
    flipped = analysis.pca_2d(-codes.z, codes.labels)
    np.testing.assert_allclose(flipped, analysis.pca_2d(codes.z, codes.labels), atol=1e-5)  # signs fixed
    assert (flipped[codes.labels == 0].mean(0) > flipped.mean(0)).all()
    shifted = first - 100.0  # UMAP output is not centred: the convention is relative to the mean
    np.testing.assert_array_equal(analysis.orient(shifted, codes.labels), shifted)


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory):
    """A tiny VAE trained with the analysis every epoch, in a store of its own."""
    uri = f"sqlite:///{tmp_path_factory.mktemp('store') / 'mlflow.db'}"
    config = parse_config([*TINY, "--analysis.every_n_epochs", "1", "--tracking.uri", uri,
                           "--fit.checkpoint_dir", str(tmp_path_factory.mktemp("ckpt"))])  # fmt: skip
    return run_training(config), uri


def test_every_run_logs_its_analysis(trained) -> None:
    result, uri = trained
    client = MlflowClient(uri)
    run = client.get_run(result.run_id)
    for key in ("silhouette_latent", "silhouette_pca", "silhouette_umap", "knn_acc", "probe_acc", "active_units"):
        assert run.data.metrics[key] == result.metrics[key] == result.latent.scores[key]
    assert [m.step for m in client.get_metric_history(result.run_id, "silhouette_pca")] == [0, 1, 2]
    files = {item.path for item in client.list_artifacts(result.run_id, "latent")}
    expected = {"pca.png", "umap.png", "reconstructions.png", "prior_samples.png", "traversal.png", "codes.npz"}
    assert {f"latent/{name}" for name in expected} <= files
    assert {"latent/epoch_000", "latent/epoch_001"} <= files
    with np.load(client.download_artifacts(result.run_id, "latent/codes.npz")) as saved:
        assert saved["z"].shape == (1000, 4) and saved["labels"].shape == (1000,)
        np.testing.assert_array_equal(saved["pca"], result.latent.projections["pca"])
        assert analysis.silhouette(saved["z"], saved["labels"], 400) == run.data.metrics["silhouette_latent"]


def test_same_run_analysed_twice_is_identical(trained) -> None:
    result, uri = trained
    options = analysis.AnalysisOptions(sample_size=400)
    first = analysis.analyze(result.model, result.datamodule, options)
    second = analysis.analyze(result.model, result.datamodule, options)
    assert first.scores == second.scores == result.latent.scores
    np.testing.assert_array_equal(first.projections["pca"], second.projections["pca"])
    np.testing.assert_array_equal(first.projections["umap"], second.projections["umap"])


def test_aevae_analyze_adds_the_same_analysis_to_the_run(trained, capsys: pytest.CaptureFixture) -> None:
    result, uri = trained
    assert main(["analyze", "--run-id", result.run_id, "--tracking-uri", uri, "--sample_size", "400"]) == 0
    assert "silhouette_pca=" in capsys.readouterr().out
    history = MlflowClient(uri).get_metric_history(result.run_id, "silhouette_pca")
    assert [m.step for m in history] == [0, 1, 2, 2]  # the new value sits at the latest step
    assert history[-1].value == result.metrics["silhouette_pca"]


def test_sampled_codes_differ_from_the_mean_but_are_seeded(trained) -> None:
    result, _ = trained
    images, labels = analysis.labelled_split(result.datamodule, "test")
    mean = analysis.encode(result.model, images, labels)
    sampled = analysis.encode(result.model, images, labels, sample=True, seed=5)
    np.testing.assert_array_equal(sampled.z, analysis.encode(result.model, images, labels, sample=True, seed=5).z)
    assert not np.array_equal(sampled.z, mean.z)
    np.testing.assert_array_equal(sampled.mean, mean.z)


def cli_error(args: list[str], capsys: pytest.CaptureFixture) -> str:
    capsys.readouterr()
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    return err


def test_unknown_store_unknown_run_and_run_without_checkpoint(tracking_uri: str, capsys: pytest.CaptureFixture) -> None:
    assert "tracking-uri: no store at" in cli_error(["analyze", "--run-id", "abc123", "--tracking-uri", tracking_uri], capsys)
    client = MlflowClient(tracking_uri)
    run_id = client.create_run(client.create_experiment("bare")).info.run_id
    assert "no run 'abc123'" in cli_error(["analyze", "--run-id", "abc123", "--tracking-uri", tracking_uri], capsys)
    err = cli_error(["analyze", "--run-id", run_id, "--tracking-uri", tracking_uri], capsys)
    assert "has no config.yaml" in err
    run = client.get_run(run_id)
    assert not run.data.metrics and not client.list_artifacts(run_id)


def test_latent_dim_1_fails_before_any_run(tracking_uri: str, capsys: pytest.CaptureFixture, tmp_path: Path) -> None:
    err = cli_error(["train", *TINY, "--model.init_args.latent_dim", "1", "--tracking.uri", tracking_uri], capsys)
    assert "model.latent_dim" in err and "2-D projection" in err
    client = MlflowClient(tracking_uri)
    assert not client.search_runs([e.experiment_id for e in client.search_experiments()])


def test_unlabelled_split_skips_the_label_scores_and_says_why(tmp_path: Path) -> None:
    datamodule = ImageDataModule(source="mnist-5k")
    datamodule.setup()
    test = datamodule.splits["test"]
    datamodule.splits["test"] = InMemoryImages(test.images, torch.full_like(test.labels, -1))
    options = analysis.AnalysisOptions(umap=False)
    result = analysis.analyze(VAE(latent_dim=4, hidden_dims=[8]), datamodule, options)
    assert not any(key.startswith(("silhouette", "knn", "probe")) for key in result.scores)
    assert set(result.skipped) == {"silhouette_latent", "silhouette_pca", "knn_acc", "probe_acc"}
    assert "active_units" in result.scores and "kl_dim_3" in result.scores  # the KL scores need no labels
    assert result.grids["reconstructions"].shape == (2, 10, 1, 28, 28)  # the first ten images
    files = {path.name for path in analysis.write_analysis(result, tmp_path)}
    assert {"pca.png", "reconstructions.png", "prior_samples.png", "skipped.txt"} <= files
    assert "no class labels" in (tmp_path / "skipped.txt").read_text()

"""Sample quality: Fréchet distance and k-NN precision/recall on known answers, generation, `aevae samples`."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from mlflow import MlflowClient

from aevae.samples import frechet_distance, frechet_distance_from_stats, gmm_codes, knn_radii, precision_recall

pytestmark = pytest.mark.xdist_group("test_samples")  # `make test`: one worker runs this file, making `vae_run` once


def test_frechet_distance_of_a_set_with_itself_is_zero() -> None:
    features = np.random.default_rng(0).normal(size=(2000, 8))
    assert frechet_distance(features, features) == pytest.approx(0.0, abs=1e-6)


def test_frechet_distance_of_gaussians_matches_the_closed_form() -> None:
    d, shift = 6, np.arange(6.0)
    # N(0, I) against N(shift, 4I): |shift|^2 + d (1 + 4 - 2 * 2) = 55 + 6
    assert frechet_distance_from_stats(np.zeros(d), np.eye(d), shift, 4 * np.eye(d)) == pytest.approx(61.0)
    features = np.random.default_rng(0).normal(size=(4000, d))
    assert frechet_distance(features, features + shift) == pytest.approx(55.0, abs=1e-6)  # same covariance
    assert frechet_distance(features, 2 * features + shift) == pytest.approx(61.0, rel=0.05)  # sampled


def test_precision_and_recall_of_identical_sets_are_one_and_of_far_sets_zero() -> None:
    features = np.random.default_rng(0).normal(size=(500, 4))
    assert precision_recall(features, features) == (1.0, 1.0)
    assert precision_recall(features, features + 100.0) == (0.0, 0.0)


def test_precision_recall_on_a_hand_case() -> None:
    real = np.array([[0.0], [1.0], [2.0], [3.0], [10.0]])  # 3-NN radii: 3, 2, 2, 3, 9
    generated = np.array([[0.5], [20.0], [30.0], [40.0], [50.0]])  # 3-NN radii: 39.5, 20, 20, 20, 30
    assert knn_radii(torch.from_numpy(real), 3).tolist() == [3.0, 2.0, 2.0, 3.0, 9.0]  # self excluded
    assert knn_radii(torch.from_numpy(generated), 3).tolist() == [39.5, 20.0, 20.0, 20.0, 30.0]
    precision, recall = precision_recall(real, generated, k=3)
    assert precision == 1 / 5  # only 0.5 lies in a real ball; 20 is 10 from 10, outside its radius 9
    assert recall == 1.0  # every real point is within 29.5 of 0.5


def test_gmm_codes_follow_the_training_codes_and_are_seeded() -> None:
    rng = np.random.default_rng(0)
    codes = np.r_[rng.normal(-5, 0.1, size=(300, 2)), rng.normal(5, 0.1, size=(300, 2))]
    drawn = gmm_codes(codes, 1000, components=2, seed=0)
    assert torch.equal(drawn, gmm_codes(codes, 1000, components=2, seed=0))
    assert (drawn.abs() > 4).all() and 0.4 < (drawn[:, 0] > 0).float().mean() < 0.6


@pytest.fixture(scope="module")
def vae_run(tmp_path_factory: pytest.TempPathFactory):
    from test_ood import tiny

    from aevae.training import parse_config, run_training

    uri = f"sqlite:///{tmp_path_factory.mktemp('store') / 'mlflow.db'}"
    config = parse_config([*tiny("vae"), "--tracking.uri", uri, "--fit.checkpoint_dir", str(tmp_path_factory.mktemp("ckpt"))])
    return run_training(config).run_id, uri


def test_aevae_samples_logs_scores_and_trains_the_classifier_once(vae_run, capsys) -> None:
    from aevae.cli import main

    run_id, uri = vae_run
    client = MlflowClient(uri)
    old = client.create_run(client.create_experiment("feature-nets"), tags={"source": "mnist-5k", "seed": "0"})
    client.set_terminated(old.info.run_id)  # a net of the first version (no weights here): not to be loaded
    for _ in range(2):
        assert main(["samples", "--run-id", run_id, "--n", "300", "--tracking-uri", uri]) == 0
    assert "prior/fd=" in capsys.readouterr().out
    metrics = client.get_run(run_id).data.metrics
    for sampler in ("prior", "gmm"):
        assert metrics[f"samples/{sampler}/fd"] > metrics["samples/test_fd_half"] >= 0
        assert 0 <= metrics[f"samples/{sampler}/precision"] <= 1 and 0 <= metrics[f"samples/{sampler}/recall"] <= 1
    assert metrics["samples/classifier_test_acc"] > 0.9
    nets = client.search_runs([client.get_experiment_by_name("feature-nets").experiment_id])
    assert len(nets) == 2  # the old version's and one new: the second call loaded the new one
    assert {item.path for item in client.list_artifacts(run_id, "samples")} == {"samples/prior.png", "samples/gmm.png"}


@pytest.mark.parametrize("extra, message", [(["--n", "1"], "n: must be >= 4"), (["--components", "0"], "components")])
def test_bad_samples_input_is_one_line_exit_2_and_writes_nothing(
    vae_run, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capfd: pytest.CaptureFixture, extra, message
) -> None:  # in this process, as tests/test_bad_input.py: capfd sees all a library writes to the terminal too
    from conftest import aevae_here

    run_id, uri = vae_run
    client = MlflowClient(uri)
    before = (client.get_run(run_id).data.metrics, client.list_artifacts(run_id), len(client.search_experiments()))
    monkeypatch.chdir(tmp_path)
    code, _, err = aevae_here(capfd, "samples", "--run-id", run_id, *extra, "--tracking-uri", uri)
    assert code == 2, err
    assert len(err.strip().splitlines()) == 1 and message in err, err
    assert (client.get_run(run_id).data.metrics, client.list_artifacts(run_id), len(client.search_experiments())) == before
    assert not list(tmp_path.iterdir())


def test_shifted_images_keep_their_content_and_are_seeded() -> None:
    from aevae.feature_net import shifted

    images = torch.zeros(200, 1, 28, 28)
    images[:, :, 12:16, 12:16] = torch.rand(200, 1, 4, 4, generator=torch.Generator().manual_seed(0)) + 0.1
    moved = shifted(images, torch.Generator().manual_seed(1), shift=2)
    assert torch.equal(moved, shifted(images, torch.Generator().manual_seed(1), shift=2))
    assert torch.allclose(moved.sum((1, 2, 3)), images.sum((1, 2, 3)))  # a central blob is moved, not cut
    rows = moved.sum((1, 3)).nonzero()[:, 1].view(200, 4)[:, 0] - 12  # each image's vertical offset
    assert set(rows.tolist()) == {-2, -1, 0, 1, 2}  # every offset in range, no other
    for image, original, offset in zip(moved, images, rows):
        assert torch.allclose(image.sum(2)[0, 12 + offset : 16 + offset], original.sum(2)[0, 12:16])

"""`aevae compare` on a tiny budget: the parent run, its children, the figure and the table, read back from MLflow."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest
from mlflow import MlflowClient

from aevae import compare, training
from aevae.cli import main

REPO = Path(__file__).resolve().parents[1]


def tiny(tracking_uri: str, out: Path, *extra: str) -> list[str]:
    return [
        "compare", "--config", str(REPO / "experiments" / "ae_vs_vae_demo.yaml"),
        "--model.init_args.hidden_dims", "[32]", "--trainer.max_epochs", "1", "--trainer.limit_train_batches", "3",
        "--analysis.sample_size", "300", "--analysis.umap", "false", "--compare.seeds", "[0, 1]", "--tracking.uri", tracking_uri,
        "--compare.output_dir", str(out), "--fit.checkpoint_dir", str(out / "checkpoints"), *extra,
    ]  # fmt: skip


def all_runs(client: MlflowClient) -> list:
    return client.search_runs([e.experiment_id for e in client.search_experiments()])


def test_compare_records_parent_children_figure_and_table(tracking_uri: str, tmp_path: Path, capsys) -> None:
    assert main(tiny(tracking_uri, tmp_path / "out")) == 0
    printed = capsys.readouterr().out
    client = MlflowClient(tracking_uri)
    runs = all_runs(client)
    (parent,) = [run for run in runs if "mlflow.parentRunId" not in run.data.tags]
    children = [run for run in runs if run.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert parent.info.status == "FINISHED" and parent.data.tags["compare"] == "ae-vs-vae"
    assert sorted((run.data.tags["model_kind"], run.data.tags["seed"]) for run in children) == [
        ("ae", "0"), ("ae", "1"), ("vae", "0"), ("vae", "1")
    ]  # fmt: skip
    for child in children:
        assert child.info.status == "FINISHED" and "silhouette_pca" in child.data.metrics
        assert child.data.params["model.hidden_dims"] == "[32]" and child.data.params["model.latent_dim"] == "4"
    files = {item.path for item in client.list_artifacts(parent.info.run_id, "compare")}
    assert files == {"compare/ae_vs_vae.png", "compare/scores.csv", "compare/scores.md"}
    with open(client.download_artifacts(parent.info.run_id, "compare/scores.csv", str(tmp_path))) as file:
        rows = {row["score"]: row for row in csv.DictReader(file)}
    ae = [c.data.metrics["silhouette_pca"] for c in children if c.data.tags["model_kind"] == "ae"]
    vae = [c.data.metrics["silhouette_pca"] for c in children if c.data.tags["model_kind"] == "vae"]
    assert float(rows["silhouette_pca"]["ae_mean"]) == pytest.approx(sum(ae) / 2)
    assert float(rows["silhouette_pca"]["vae-ae_mean"]) == pytest.approx(sum(vae) / 2 - sum(ae) / 2)
    assert 0 <= float(rows["silhouette_pca"]["vae-ae_p"]) <= 1
    assert rows["active_units"]["ae_mean"] == "" and rows["silhouette_pca"]["seeds"] == "2"
    assert parent.data.metrics["silhouette_pca/vae-ae_mean"] == pytest.approx(float(rows["silhouette_pca"]["vae-ae_mean"]))
    assert "| silhouette_pca |" in printed and f"figure: {tmp_path / 'out' / 'ae_vs_vae.png'}" in printed


def test_compare_adds_ood_and_sample_quality_rows(tracking_uri: str, tmp_path: Path, capsys) -> None:
    ood = "{against: fashion-mnist, k: 3, max_images: 100, bootstrap: 5}"
    args = tiny(tracking_uri, tmp_path / "out", "--compare.seeds", "[0]", "--compare.ood", ood,
                "--compare.samples", "{n: 100}")  # fmt: skip
    assert main(args) == 0
    printed = capsys.readouterr().out
    client = MlflowClient(tracking_uri)
    vae = [run for run in all_runs(client) if run.data.tags.get("model_kind") == "vae"][0]
    for key in ("ood/fashion-mnist/iwae/auroc", "samples/prior/fd", "samples/gmm/precision"):
        assert key in vae.data.metrics
        assert f"| {key} |" in printed
    assert "| ood/fashion-mnist/recon/auroc |" in printed  # both models have it
    assert client.get_experiment_by_name("feature-nets") is not None  # the cached classifier


def test_children_are_ordinary_reproducible_configs() -> None:
    config = training.parse_config(["--config", str(REPO / "experiments" / "ae_vs_vae.yaml")], compare.compare_parser())
    children = compare.child_configs(config)
    assert [(kind, seed) for kind, seed, _ in children] == [(k, s) for k in ("ae", "vae") for s in (0, 1, 2)]
    ae, vae = children[0][2], children[3][2]
    assert ae.model.init_args.hidden_dims == vae.model.init_args.hidden_dims == [512, 256]
    assert ae.model.init_args.latent_dim == vae.model.init_args.latent_dim == 4
    assert "kl_weight" not in ae.model.init_args and vae.model.init_args.kl_weight == 1.0
    assert ae.data == vae.data and ae.trainer == vae.trainer


def test_variants_override_the_experiment_and_are_each_compared_with_the_first() -> None:
    models = "[aevae.models.AE, aevae.models.VAE, {class_path: aevae.models.VAE, init_args: {kl_weight: 0.1}}]"
    config = training.parse_config(
        ["--config", str(REPO / "experiments" / "ae_vs_vae.yaml"), "--compare.models", models, "--compare.seeds", "[0]"],
        compare.compare_parser(),
    )
    children = compare.child_configs(config)
    assert [label for label, _, _ in children] == ["ae", "vae", "vae_kl_weight0.1"]
    assert [child.model.init_args.kl_weight for _, _, child in children[1:]] == [1.0, 0.1]
    assert children[2][2].model.init_args.hidden_dims == [512, 256]  # the rest is the experiment's

    runs = {0: {"knn_acc": 0.80}, 1: {"knn_acc": 0.82}, 2: {"knn_acc": 0.81}}
    better = {seed: {"knn_acc": value["knn_acc"] + 0.05 + 0.001 * seed} for seed, value in runs.items()}
    (row,) = compare.score_table({"ae": runs, "vae": runs, "vae_kl_weight0.1": better})
    assert row["vae-ae_mean"] == 0 and row["vae-ae_p"] == 1.0
    assert row["vae_kl_weight0.1-ae_mean"] == pytest.approx(0.051) and row["vae_kl_weight0.1-ae_p"] < 0.001
    table = compare.markdown_table([row], ["ae", "vae", "vae_kl_weight0.1"])
    assert "| VAE_KL_WEIGHT0.1 - AE | p |" in table and "paired t-test" in table


def test_paired_p_matches_a_hand_computed_t_test() -> None:
    # differences 1, 2, 3: mean 2, sd 1, t = 2 / (1 / sqrt 3) = 3.464 with 2 degrees of freedom: p = 0.0742
    assert compare.paired_p([1.0, 2.0, 3.0]) == pytest.approx(0.0742, abs=1e-4)
    assert compare.paired_p([0.5]) is None


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--compare.models", "[aevae.models.AE]"], "compare.models"),
        (["--compare.models", "[aevae.models.AE, aevae.models.AE]"], "compare.models: the same variant twice"),
        (["--compare.models", "[aevae.models.AE, {class_path: aevae.models.VAE, init_args: {kl_weight: -1}}]"],
         "compare.models (vae_kl_weight-1): model.kl_weight"),
        (["--compare.models", "[aevae.models.AE, {class_path: aevae.models.VAE, beta: 2}]"], "compare.models[1]"),
        (["--compare.seeds", "[]"], "compare.seeds"),
        (["--analysis.enabled", "false"], "analysis.enabled"),
        (["--model.init_args.latent_dim", "1"], "model.latent_dim"),
        (["--compare.ood", "{against: cifar}"], "compare.ood: against: unknown source 'cifar'"),
        (["--compare.ood", "{against: mnist-5k}"], "compare.ood: against: the run was trained on mnist-5k"),
        (["--compare.samples", "{n: 1}"], "n: must be >= 4"),
    ],
)
def test_bad_compare_input_is_one_line_and_logs_nothing(extra, message, tracking_uri, tmp_path, capsys) -> None:
    assert main(tiny(tracking_uri, tmp_path, *extra)) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and message in err, err
    assert not Path(tracking_uri.removeprefix("sqlite:///")).exists() or not all_runs(MlflowClient(tracking_uri))


def test_a_failing_child_fails_the_parent(tracking_uri: str, tmp_path: Path, monkeypatch) -> None:
    def broken(config, parent_run_id=None, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(training, "run_training", broken)
    with pytest.raises(RuntimeError, match="disk full"):
        main(tiny(tracking_uri, tmp_path))
    (parent,) = all_runs(MlflowClient(tracking_uri))
    assert parent.info.status == "FAILED" and "disk full" in parent.data.tags["failure_reason"]

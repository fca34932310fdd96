"""Nothing runs that the user did not allow, nothing secret is recorded."""

from __future__ import annotations

from pathlib import Path

from mlflow import MlflowClient

from aevae.tracking import flatten, mask_secrets
from conftest import REPO, aevae_here, run_aevae

DEMO = str(REPO / "experiments" / "vae_demo.yaml")
EVIL = '''
from pathlib import Path
Path(__file__).with_name("imported").write_text("module code ran")
class VAE:
    pass
'''


def test_class_paths_outside_the_allow_list_are_not_even_imported(tmp_path: Path) -> None:
    (tmp_path / "evil.py").write_text(EVIL)
    env = {"PYTHONPATH": str(tmp_path)}
    refused = run_aevae("train", "--config", DEMO, "--model", "evil.VAE", cwd=tmp_path, env=env)
    assert refused.returncode == 2
    assert "Importing 'evil.VAE' is not allowed" in refused.stderr
    assert not (tmp_path / "imported").exists()
    allowed = run_aevae("--allow-import", "evil", "train", "--config", DEMO, "--model", "evil.VAE", cwd=tmp_path, env=env)
    assert (tmp_path / "imported").exists()  # the explicit flag lets it import...
    assert allowed.returncode == 2 and "does not correspond to a subclass of LatentAutoencoder" in allowed.stderr
    assert not (tmp_path / "mlruns").exists()


def test_yaml_tags_that_build_python_objects_are_refused(tmp_path: Path, monkeypatch, capfd) -> None:
    config = tmp_path / "evil.yaml"
    config.write_text(f"seed: !!python/object/apply:os.system ['touch {tmp_path / 'pwned'}']\n")
    monkeypatch.chdir(tmp_path)
    code, _, err = aevae_here(capfd, "train", "--config", DEMO, "--config", str(config))
    assert code == 2
    assert not (tmp_path / "pwned").exists()
    assert len(err.strip().splitlines()) == 1


def test_passwords_in_urls_are_masked() -> None:
    assert mask_secrets("postgresql://ann:s3cr3t@db.lab:5432/optuna") == "postgresql://ann:***@db.lab:5432/optuna"
    assert mask_secrets("sqlite:////tmp/mlruns/mlflow.db") == "sqlite:////tmp/mlruns/mlflow.db"
    flat = flatten({"tracking": {"uri": "https://bob:hunter2@mlflow.lab"}, "model": {"latent_dim": 4}})
    assert flat == {"tracking.uri": "https://bob:***@mlflow.lab", "model.latent_dim": 4}


def test_a_secret_in_a_tracking_uri_is_never_printed(tmp_path: Path) -> None:
    result = run_aevae(
        "train", "--config", DEMO, "--tracking.uri", "postgresql://ann:s3cr3t@127.0.0.1:1/none", cwd=tmp_path, timeout=120
    )
    assert result.returncode != 0
    assert "s3cr3t" not in result.stdout + result.stderr
    assert "ann:***@" in result.stderr


def test_logged_params_and_config_hold_no_secret(tmp_path: Path, tracking_uri: str, monkeypatch, capfd) -> None:
    monkeypatch.chdir(tmp_path)  # what it records is the point here, not what a process prints: in this process
    code, _, err = aevae_here(
        capfd, "train", "--config", DEMO, "--model.hidden_dims", "[16]", "--trainer.max_epochs", "1",
        "--trainer.limit_train_batches", "2", "--trainer.limit_val_batches", "1", "--analysis.enabled", "false",
        "--tracking.uri", tracking_uri, "--tracking.run_name", "run-with-secret",
        "--data.root", "https://user:topsecret@data.lab/mnist",
    )  # fmt: skip
    assert code == 0, err[-2000:]
    client = MlflowClient(tracking_uri)
    (run,) = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert run.data.params["data.root"] == "https://user:***@data.lab/mnist"
    config = Path(client.download_artifacts(run.info.run_id, "config.yaml", str(tmp_path))).read_text()
    assert "topsecret" not in config and "user:***@" in config

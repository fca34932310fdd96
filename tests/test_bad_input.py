"""Bad input, tried systematically: every command, each malformed input once.

Each row runs in a fresh folder (or a copy of a store that holds a trained run, a bare run and two studies)
and must end with exit code 2 and one stderr line `aevae <command>: error: ...` that names the field,
with no traceback, and with nothing written: no file, no MLflow run, no Optuna study or trial, no model.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import os
import shutil
import sqlite3
import tempfile
import warnings
from contextlib import closing
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import optuna
import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st
from mlflow import MlflowClient

from aevae import sweep, tracking
from aevae.analysis import AnalysisOptions
from aevae.cli import main
from aevae.errors import UsageError
from aevae.training import check_trainer, instantiate, parse_config, run_training
from conftest import REPO, run_aevae

DEMO = str(REPO / "experiments" / "vae_demo.yaml")
COMPARE = str(REPO / "experiments" / "ae_vs_vae_demo.yaml")
SECRET = "pw-s3cr3t"
UNREACHABLE = f"postgresql://ann:{SECRET}@127.0.0.1:1/none"
HUGE = str(10**9)
TINY = ["--model.hidden_dims", "[16]", "--trainer.max_epochs", "1", "--trainer.limit_train_batches", "3",
        "--trainer.limit_val_batches", "1", "--trainer.enable_progress_bar", "false", "--fit.test", "false",
        "--analysis.enabled", "false"]  # fmt: skip
INPUTS = {  # written into every test folder
    "empty.yaml": "",
    "list.yaml": "- seed\n- model\n",
    "scalar.yaml": "42\n",
    "broken.yaml": "model: [unclosed\n",
    "unknown_key.yaml": "optimizer: {name: adam}\n",
    "batch0.yaml": "data: {batch_size: 0}\n",
    "null_seed.yaml": "seed: null\n",
    "null_latent.yaml": "model: {init_args: {latent_dim: null}}\n",
}
SWEEP: dict[str, Any] = {  # a valid sweep; rows replace top-level keys
    "experiment": DEMO,
    "overrides": {"model.hidden_dims": [16], "trainer.max_epochs": 1, "analysis.enabled": False},
    "space": {"model.latent_dim": {"low": 2, "high": 4}},
    "objectives": [{"metric": "val/loss", "direction": "minimize"}],
    "n_trials": 1,
}
SQLITE_SIDE_FILES = ("-wal", "-shm", "-journal")
RECORD_TABLES = {
    "mlflow.db": ("experiments", "runs", "metrics", "params", "tags", "registered_models", "model_versions"),
    sweep.STORE_FILE: ("studies", "trials", "trial_values", "trial_params"),
}


@dataclass(frozen=True)
class Store:
    """A folder whose mlruns/ holds a trained run, a bare finished run (no artifacts), and two studies:
    "done" (one complete trial, the trained run) and "empty" (no trial)."""

    folder: Path
    run: str
    bare: str


@pytest.fixture(scope="session")
def store(tmp_path_factory: pytest.TempPathFactory) -> Store:
    folder = tmp_path_factory.mktemp("bad_input_store")
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(folder)  # the run records relative paths: a reproduction writes into its own folder
        result = run_training(parse_config(["--config", DEMO, *TINY]))
    os.environ.pop("MLFLOW_TRACKING_URI", None)  # MLflow set it for subprocesses; the rows use their own folder's store
    client = MlflowClient(result.tracking_uri)
    bare = client.create_run(client.get_run(result.run_id).info.experiment_id, run_name="bare").info.run_id
    client.set_terminated(bare)
    storage = sweep.open_storage(sweep.default_storage(result.tracking_uri))
    done = optuna.create_study(storage=storage, study_name="done")
    trial = optuna.trial.create_trial(
        params={"model.latent_dim": 4},
        distributions={"model.latent_dim": optuna.distributions.IntDistribution(2, 8)},
        value=1.0,
        user_attrs={sweep.RUN_ID_ATTR: result.run_id},
    )
    done.add_trial(trial)
    optuna.create_study(storage=storage, study_name="empty")
    storage.engine.dispose()  # the write-ahead log goes into optuna.db
    return Store(folder, result.run_id, bare)


def row(command: str, *args: str, field: str, store: bool = False, sweep: dict | None = None) -> Any:
    """One malformed input: the command's arguments ({run}, {bare}, {tmp} filled in), the field its error
    must name, whether it runs in a copy of the store, and changes to SWEEP written as sweep.yaml."""
    name = f"{command}-{field}-{' '.join(args)}".replace(f"{REPO}/", "")[:100]
    return pytest.param(command, args, field, store, sweep, id=name)


CASES = [
    # train: files that are not experiment configs
    row("train", "--config", "empty.yaml", field="--config"),
    row("train", "--config", "list.yaml", field="--config"),
    row("train", "--config", "scalar.yaml", field="--config"),
    row("train", "--config", "broken.yaml", field="--config"),
    row("train", "--config", "missing.yaml", field="config"),
    row("train", "--config", DEMO, "--config", "unknown_key.yaml", field="optimizer"),
    row("train", "--config", DEMO, "--config", "batch0.yaml", field="data.batch_size"),
    row("train", "--config", DEMO, "--config", "null_seed.yaml", field="seed"),
    row("train", "--config", DEMO, "--config", "null_latent.yaml", field="model.latent_dim"),
    # train: wrong types, out-of-range and huge values
    row("train", "--config", DEMO, "--seed", "abc", field="seed"),
    row("train", "--config", DEMO, "--seed", "-1", field="seed"),
    row("train", "--config", DEMO, "--seed", str(2**32), field="seed"),
    row("train", "--config", DEMO, "--model.latent_dim", HUGE, field="model.latent_dim"),
    row("train", "--config", DEMO, "--model.hidden_dims", f"[{HUGE}]", field="model.hidden_dims"),
    row("train", "--config", DEMO, "--model.hidden_dims", "[0]", field="model.hidden_dims"),
    row("train", "--config", DEMO, "--model.hidden_dims", "[65536, 65536, 65536]", field="model.hidden_dims"),
    row("train", "--config", DEMO, "--model.architecture", "conv", "--model.hidden_dims", "[65536, 65536, 65536]",
        field="model.hidden_dims"),
    row("train", "--config", DEMO, "--model.kl_weight", "nan", field="model.kl_weight"),
    row("train", "--config", DEMO, "--model.kl_weight", ".nan", field="model.kl_weight"),
    row("train", "--config", DEMO, "--model.kl_weight=-.inf", field="model.kl_weight"),
    row("train", "--config", DEMO, "--model.kl_weight", "heavy", field="model.kl_weight"),
    row("train", "--config", DEMO, "--model.lr", "0", field="model.lr"),
    row("train", "--config", DEMO, "--model.architecture", "transformer", field="model.architecture"),
    row("train", "--config", DEMO, "--model", "aevae.models.GAN", field="model"),
    row("train", "--config", DEMO, "--data.val_fraction", "1.5", field="data.val_fraction"),
    row("train", "--config", DEMO, "--data.num_workers", "-1", field="data.num_workers"),
    row("train", "--config", DEMO, "--trainer.max_epochs", "-5", field="max_epochs"),
    row("train", "--config", DEMO, "--trainer.accelerator", "tpu9", field="trainer"),
    row("train", "--config", DEMO, "--trainer.devices", "0", field="trainer"),
    row("train", "--config", DEMO, "--trainer.precision", "7", field="trainer.precision"),
    row("train", "--config", DEMO, "--fit.on_nonfinite", "ignore", field="fit.on_nonfinite"),
    row("train", "--config", DEMO, "--fit.early_stopping_patience", "0", field="fit.early_stopping_patience"),
    row("train", "--config", DEMO, "--fit.resume", "no-such-run", field="fit.resume"),
    row("train", "--config", DEMO, "--analysis.split", "train", field="analysis.split"),
    row("train", "--config", DEMO, "--analysis.sample_size", "0", field="analysis.sample_size"),
    row("train", "--config", DEMO, "--analysis.seed", "-1", field="analysis.seed"),
    # train: tracking stores that are malformed or unreachable
    row("train", "--config", DEMO, "--tracking.uri", "notascheme://x", field="tracking.uri"),
    row("train", "--config", DEMO, "--tracking.uri", "postgresql//x", field="tracking.uri"),
    row("train", "--config", DEMO, "--tracking.uri", UNREACHABLE, field="tracking.uri"),
    row("train", "--config", DEMO, "--tracking.uri", "http://127.0.0.1:1", field="tracking.uri"),
    row("train", "--config", DEMO, "--tracking.uri", "sqlite:///{tmp}/store/mlflow.txt", field="tracking.uri"),
    # compare
    row("compare", "--config", COMPARE, "--compare.seeds", "[]", field="compare.seeds"),
    row("compare", "--config", COMPARE, "--compare.seeds", "[1, 1]", field="compare.seeds"),
    row("compare", "--config", COMPARE, "--compare.seeds", "abc", field="compare.seeds"),
    row("compare", "--config", COMPARE, "--compare.models", "[aevae.models.AE, aevae.models.GAN]", field="compare.models"),
    row("compare", "--config", COMPARE, "--compare.models", "[aevae.models.AE, os.system]", field="compare.models"),
    row("compare", "--config", COMPARE, "--compare.repeats", "3", field="compare.repeats"),
    row("compare", "--config", "list.yaml", field="--config"),
    row("compare", "--config", "missing.yaml", field="config"),
    row("compare", "--config", COMPARE, "--model.latent_dim", HUGE, field="model.latent_dim"),
    row("compare", "--config", COMPARE, "--compare.seeds", "[0, -1]", field="seed"),
    row("compare", "--config", COMPARE, "--tracking.uri", "notascheme://x", field="tracking.uri"),
    # sweep: files that are not sweep configs
    row("sweep", "--config", "missing.yaml", field="--config"),
    row("sweep", "--config", "empty.yaml", field="empty.yaml"),
    row("sweep", "--config", "list.yaml", field="list.yaml"),
    row("sweep", "--config", "broken.yaml", field="--config"),
    row("sweep", field="config"),
    # sweep: search spaces, objectives, budgets
    row("sweep", "--config", "sweep.yaml", field="space.model.latnt_dim", sweep={"space": {"model.latnt_dim": [2, 4]}}),
    row("sweep", "--config", "sweep.yaml", field="space.model.latent_dim", sweep={"space": {"model.latent_dim": []}}),
    row("sweep", "--config", "sweep.yaml", field="space.model.latent_dim",
        sweep={"space": {"model.latent_dim": {"low": 8, "high": 2}}}),
    row("sweep", "--config", "sweep.yaml", field="space.model.kl_weight",
        sweep={"space": {"model.kl_weight": {"low": 0.0, "high": 1.0, "log": True}}}),
    row("sweep", "--config", "sweep.yaml", field="space.model.latent_dim",
        sweep={"space": {"model.latent_dim": {"low": 2, "high": 10**9}}}),
    row("sweep", "--config", "sweep.yaml", field="space", sweep={"space": ["model.latent_dim"]}),
    row("sweep", "--config", "sweep.yaml", field="objectives[0].metric", sweep={"objectives": [{"metric": "val/elbo"}]}),
    row("sweep", "--config", "sweep.yaml", field="objectives[0].direction",
        sweep={"objectives": [{"metric": "val/loss", "direction": "up"}]}),
    row("sweep", "--config", "sweep.yaml", field="sampler.name", sweep={"sampler": "grid-ish"}),
    row("sweep", "--config", "sweep.yaml", field="experiment", sweep={"experiment": "missing.yaml"}),
    row("sweep", "--config", "sweep.yaml", field="data.batch_size",
        sweep={"overrides": {**SWEEP["overrides"], "data.batch_size": 0}}),
    row("sweep", "--config", "sweep.yaml", field="grace_period", sweep={"heartbeat_interval": 5, "grace_period": 2}),
    row("sweep", "--config", "sweep.yaml", "--n-trials", "0", field="n_trials"),
    row("sweep", "--config", "sweep.yaml", "--workers", "0", field="workers"),
    row("sweep", "--config", "sweep.yaml", "--timeout", "-1", field="timeout"),
    # sweep: storages and study names
    row("sweep", "--config", "sweep.yaml", "--storage", "postgresql//x", field="storage"),
    row("sweep", "--config", "sweep.yaml", "--storage", "notascheme://", field="storage"),
    row("sweep", "--config", "sweep.yaml", "--storage", UNREACHABLE, field="storage"),
    row("sweep", "--config", "sweep.yaml", field="storage", sweep={"storage": "sqlite:///{tmp}"}),
    row("sweep", "--config", "sweep.yaml", "--study", "team/latent", field="study"),
    row("sweep", "--config", "sweep.yaml", "--study", "..", field="study"),
    row("sweep", "--config", "sweep.yaml", field="study", sweep={"study": "../elsewhere"}),
    # best
    row("best", "--study", "nope", field="--study", store=True),
    row("best", "--study", "team/done", field="study", store=True),
    row("best", "--study", "..", field="study", store=True),
    row("best", "--study", "done", "--sort", "value", field="sort", store=True),
    row("best", field="study", store=True),
    row("best", "--study", "done", field="--storage"),  # no store here
    row("best", "--study", "done", "--storage", "postgresql//x", field="storage"),
    row("best", "--study", "done", "--storage", "notascheme://", field="storage"),
    row("best", "--study", "done", "--storage", UNREACHABLE, field="storage"),
    # reproduce
    row("reproduce", "--run-id", "no-such-run", field="--run-id", store=True),
    row("reproduce", "--run-id", "{bare}", field="--run-id", store=True),
    row("reproduce", "--study", "nope", field="--study", store=True),
    row("reproduce", "--study", "empty", field="--study", store=True),
    row("reproduce", "--study", "team/done", field="study", store=True),
    row("reproduce", "--study", "../done", field="study", store=True),
    row("reproduce", field="--run-id", store=True),
    row("reproduce", "--run-id", "{run}", "--study", "done", field="--run-id", store=True),
    row("reproduce", "--run-id", "{run}", "--devices", "0", field="devices", store=True),
    row("reproduce", "--run-id", "{run}", "--devices", "3", field="--devices", store=True),
    row("reproduce", "--study", "done", "--devices", "3", field="--devices", store=True),
    row("reproduce", "--run-id", "{run}", "--devices", "two", field="devices", store=True),
    row("reproduce", "--run-id", "{run}", "--num-nodes", "0", field="num_nodes", store=True),
    row("reproduce", "--run-id", "{run}", "--max-epochs", "-5", field="max_epochs", store=True),
    row("reproduce", "--run-id", "{run}", "--tolerance", "-0.1", field="--tolerance", store=True),
    row("reproduce", "--run-id", "{run}", "--tolerance", "nan", field="tolerance", store=True),
    row("reproduce", "--run-id", "{run}", "--accelerator", "tpu9", field="accelerator", store=True),
    row("reproduce", "--run-id", "no-such-run", field="--tracking-uri"),  # no store here
    row("reproduce", "--run-id", "x", "--tracking-uri", "notascheme://x", field="tracking.uri"),
    row("reproduce", "--study", "done", "--storage", "postgresql//x", field="storage", store=True),
    # analyze
    row("analyze", "--run-id", "no-such-run", field="run-id", store=True),
    row("analyze", "--run-id", "{bare}", field="run-id", store=True),
    row("analyze", field="run_id", store=True),
    row("analyze", "--run-id", "{run}", "--split", "train", field="split", store=True),
    row("analyze", "--run-id", "{run}", "--sample_size", "0", field="sample_size", store=True),
    row("analyze", "--run-id", "{run}", "--seed", "abc", field="seed", store=True),
    row("analyze", "--run-id", "{run}", "--seed", str(2**32), field="seed", store=True),
    row("analyze", "--run-id", "{run}", "--pca", "true", field="pca", store=True),
    row("analyze", "--run-id", "no-such-run", field="tracking-uri"),  # no store here
    row("analyze", "--run-id", "x", "--tracking-uri", "notascheme://x", field="tracking.uri"),
    # ui
    row("ui", field="mlflow.db"),  # no store here
    row("ui", "--port", "0", field="--port", store=True),
    row("ui", "--port", "70000", field="--port", store=True),
    row("ui", "--port", "-1", field="--port", store=True),
    row("ui", "--port", "abc", field="--port", store=True),
    row("ui", "--host", "no-such-host.invalid", field="--host", store=True),
    row("ui", "--host", "192.0.2.1", field="--port", store=True),  # an address this machine does not have
    row("ui", "--tracking.uri", "http://127.0.0.1:1", field="tracking.uri", store=True),
    row("ui", "--tracking.uri", "notascheme://x", field="tracking.uri", store=True),
    row("ui", "--open-browser", field="--open-browser", store=True),
]


def files(folder: Path) -> dict[str, tuple[int, int] | None]:
    """Every path under folder: (size, mtime) of a file, None for a folder. SQLite's own -wal and -shm files
    come and go with its connections; what a database holds is compared by `record`."""
    return {
        str(path.relative_to(folder)): (path.stat().st_size, path.stat().st_mtime_ns) if path.is_file() else None
        for path in folder.rglob("*")
        if not path.name.endswith(SQLITE_SIDE_FILES)
    }


def record(folder: Path) -> dict[str, int | str]:
    """Rows in the tables that hold runs, models, studies and trials, and a digest of all each database holds."""
    counts: dict[str, int | str] = {}
    for name, tables in RECORD_TABLES.items():
        path = folder / "mlruns" / name
        if path.is_file():
            with closing(sqlite3.connect(path)) as db:
                counts.update({f"{name}:{t}": db.execute(f"SELECT count(*) FROM {t}").fetchone()[0] for t in tables})
                counts[name] = hashlib.sha256("\n".join(db.iterdump()).encode()).hexdigest()
    return counts


def prepare(folder: Path, store: Store | None, sweep_changes: dict | None) -> None:
    for name, text in INPUTS.items():
        (folder / name).write_text(text)
    config = {**SWEEP, **(sweep_changes or {})}
    (folder / "sweep.yaml").write_text(yaml.safe_dump(config).replace("{tmp}", str(folder)))
    if store is not None:
        shutil.copytree(store.folder / "mlruns", folder / "mlruns")
        tracking.relocate(folder / "mlruns")  # as the command would: a moved store is not a bad input


def invoke(command: str, args: list[str], folder: Path, capfd: pytest.CaptureFixture) -> tuple[int, str]:
    """The exit code and stderr of `aevae command args`, in this process; `ui` runs as its own process,
    since a good input would exec the MLflow server in its place."""
    if command == "ui":
        result = run_aevae(command, *args, cwd=folder, timeout=60)
        return result.returncode, result.stderr
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("default")
        code = main([command, *args])
    err = capfd.readouterr().err
    shown = [w for w in caught if not issubclass(w.category, (DeprecationWarning, PendingDeprecationWarning))]
    return code, err + "".join(f"{w.category.__name__}: {w.message}\n" for w in shown)


@pytest.mark.parametrize("command, args, field, in_store, sweep_changes", CASES)
def test_bad_input_is_one_line_naming_the_field_and_writes_nothing(
    command: str, args: tuple[str, ...], field: str, in_store: bool, sweep_changes: dict | None,
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capfd: pytest.CaptureFixture, request: pytest.FixtureRequest,
) -> None:  # fmt: skip
    monkeypatch.chdir(tmp_path)
    source = request.getfixturevalue("store") if in_store else None
    prepare(tmp_path, source, sweep_changes)
    fill = {"tmp": str(tmp_path), "run": source.run if source else "", "bare": source.bare if source else ""}
    before, counts = files(tmp_path), record(tmp_path)

    code, err = invoke(command, [arg.format(**fill) for arg in args], tmp_path, capfd)

    lines = err.strip().splitlines()
    assert code == 2, err
    assert len(lines) == 1 and lines[0].startswith(f"aevae {command}: error: "), err
    assert field in lines[0] and "Traceback" not in err and SECRET not in err, lines[0]
    assert files(tmp_path) == before
    assert record(tmp_path) == counts



# Random mutations of the demo config: a known key or a made-up one set to a value of any type.
KNOWN_KEYS = (
    "seed", "model.class_path", "model.init_args.latent_dim", "model.init_args.hidden_dims",
    "model.init_args.kl_weight", "model.init_args.lr", "data.source", "data.batch_size", "data.val_fraction",
    "trainer.max_epochs", "trainer.accelerator", "trainer.devices", "trainer.precision", "fit.on_nonfinite",
    "analysis.split", "analysis.seed", "analysis.sample_size",
)  # fmt: skip
VALUES = st.one_of(
    st.none(), st.booleans(), st.integers(-(2**40), 2**40), st.floats(), st.text(max_size=12),
    st.lists(st.integers(-(2**20), 2**20), max_size=3), st.dictionaries(st.text(max_size=4), st.integers(), max_size=2),
)  # fmt: skip
KEYS = st.one_of(st.sampled_from(KNOWN_KEYS), st.from_regex(r"[a-z_]{1,6}(\.[a-z_]{1,6}){0,2}", fullmatch=True))


def mutated(config: dict, key: str, value: Any) -> dict:
    """config with the dotted key set to value; a part of the path that is not a mapping becomes one."""
    *path, last = key.split(".")
    node = config
    for part in path:
        if not isinstance(node.get(part), dict):
            node[part] = {}
        node = node[part]
    node[last] = value
    return config


@settings(max_examples=20, deadline=None, derandomize=True, database=None)
@given(st.lists(st.tuples(KEYS, VALUES), min_size=1, max_size=3))
def test_random_config_mutations_build_or_fail_in_one_line(mutations: list[tuple[str, Any]]) -> None:
    """All that `train` checks before it opens the store: parse, build model and data, Trainer, analysis."""
    config = yaml.safe_load(Path(DEMO).read_text())
    for key, value in mutations:
        config = mutated(config, key, value)
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "mutated.yaml"
        path.write_text(yaml.safe_dump(config))
        try:
            parsed = parse_config(["--config", str(path)])
            instantiate(parsed)
            check_trainer(parsed)
            AnalysisOptions(**parsed.analysis.as_dict())
        except UsageError as err:
            assert len(str(err).splitlines()) == 1, str(err)
            refused_in_one_line_writing_nothing(path)


def refused_in_one_line_writing_nothing(config: Path) -> None:
    """`aevae train --config <config>`, run in an empty folder: exit 2, one line, the folder still empty."""
    with tempfile.TemporaryDirectory() as folder, contextlib.chdir(folder):
        stderr = io.StringIO()
        with contextlib.redirect_stderr(stderr), warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            code = main(["train", "--config", str(config)])
        lines = stderr.getvalue().strip().splitlines()
        assert code == 2 and len(lines) == 1 and lines[0].startswith("aevae train: error: "), stderr.getvalue()
        assert list(Path(folder).iterdir()) == [], "written before the refusal"

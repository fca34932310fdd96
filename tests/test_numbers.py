"""The figures aevae reports, against ground truth: IWAE vs exact log p(x), epoch metrics and scores by hand."""

from __future__ import annotations

import math
from pathlib import Path

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
from mlflow import MlflowClient
from lightning.pytorch.loggers import Logger
from torch import Tensor, nn

from aevae.analysis import Codes, kl_scores, probe_scores
from aevae.checkpoints import read_checkpoint
from aevae.compare import mean_std, paired_p, score_table
from aevae.batches import InMemoryImages
from aevae.data import ImageDataModule
from aevae.models import AE, VAE, gaussian_kl_per_dim, reconstruction_nll
from aevae.steps import TrainingSteps
from aevae.training import parse_config, run_training
from conftest import REPO

DEMO = str(REPO / "experiments" / "vae_demo.yaml")
GRID = torch.linspace(-12.0, 12.0, 48_001, dtype=torch.float64)  # z for the quadrature, step 5e-4


class FixedPosterior(nn.Module):
    """An encoder that proposes the same q(z|x) = N(mean, exp(logvar)) for every image."""

    def __init__(self, mean: float, logvar: float) -> None:
        super().__init__()
        self.register_buffer("params", torch.tensor([[mean, logvar]]))

    def forward(self, x: Tensor) -> Tensor:
        return self.params.expand(len(x), 2)


def one_dimensional_model() -> tuple[VAE, Tensor, Tensor]:
    """A latent_dim-1 VAE, an image drawn from its decoder, and log p(x|z) on GRID (float64)."""
    torch.manual_seed(3)
    vae = VAE(latent_dim=1, hidden_dims=[4]).eval()
    with torch.no_grad():
        vae.decoder[-2].weight.mul_(0.3)  # a posterior a few tenths wide: the grid resolves it finely
        x = torch.bernoulli(torch.sigmoid(vae.decode(torch.tensor([[0.7]]))))
        log_px_z = -reconstruction_nll(vae.decode(GRID.float()[:, None]), x.expand(len(GRID), -1, -1, -1), "bernoulli")
    return vae, x, log_px_z.double()


def exact_log_px(log_px_z: Tensor) -> float:
    """log p(x) = log of the integral of p(x|z) N(z; 0, 1) dz, by the trapezoid-free Riemann sum on GRID."""
    log_prior = -0.5 * (GRID**2 + math.log(2 * math.pi))
    step = float(GRID[1] - GRID[0])
    return float(torch.logsumexp(log_px_z + log_prior, 0)) + math.log(step)


def posterior_moments(log_px_z: Tensor) -> tuple[float, float]:
    log_joint = log_px_z - 0.5 * GRID**2
    weights = torch.softmax(log_joint, 0)
    mean = float((weights * GRID).sum())
    return mean, float((weights * (GRID - mean) ** 2).sum())


def test_iwae_converges_to_exact_log_likelihood_and_k1_is_the_elbo() -> None:
    vae, x, log_px_z = one_dimensional_model()
    truth = -exact_log_px(log_px_z)  # -log p(x), nats
    mean, var = posterior_moments(log_px_z)
    q_mean, q_logvar = mean + 0.8 * math.sqrt(var), math.log(2.0 * var)  # a proposal off the true posterior
    vae.encoder = FixedPosterior(q_mean, q_logvar)

    # ELBO by quadrature: E_q[log p(x|z)] - KL(q || prior).
    q = torch.distributions.Normal(q_mean, math.exp(0.5 * q_logvar))
    q_density = q.log_prob(GRID).exp() * float(GRID[1] - GRID[0])
    kl = float(gaussian_kl_per_dim(torch.tensor(q_mean), torch.tensor(q_logvar)))
    exact_nelbo = -float((q_density * log_px_z).sum()) + kl
    assert exact_nelbo > truth + 0.2  # the proposal leaves a gap for k to close

    torch.manual_seed(0)
    n = 20_000
    singles = vae.importance_sampled_nll(x.expand(n, -1, -1, -1), k=1, chunk=1).double()
    standard_error = float(singles.std()) / math.sqrt(n)
    assert float(singles.mean()) == pytest.approx(exact_nelbo, abs=4 * standard_error)
    out = vae(x.expand(n, -1, -1, -1))  # the training loss's pieces on the same image: recon + KL
    terms = vae.loss_terms(x.expand(n, -1, -1, -1), out)
    assert float(terms.reconstruction + terms.kl) == pytest.approx(exact_nelbo, abs=4 * standard_error)

    estimates = {k: float(vae.importance_sampled_nll(x.expand(200, -1, -1, -1), k=k, chunk=100).mean()) for k in (2, 10, 100)}
    assert exact_nelbo > estimates[2] > estimates[10] > estimates[100] > truth - 0.05  # tightens with k, a bound
    large_k = float(vae.importance_sampled_nll(x, k=20_000, chunk=5_000))
    assert large_k == pytest.approx(truth, abs=0.1)


def epoch_means(model: VAE, images: Tensor, batch_size: int = 128) -> dict[str, float]:
    """Per-image means over a split, by hand, in float64: what each `<split>/...` metric must be."""
    sums: dict[str, float] = {}
    with torch.no_grad():
        for start in range(0, len(images), batch_size):
            x = images[start : start + batch_size]
            out = model(x)
            recon = reconstruction_nll(out.recon_logits, x, "bernoulli").double()
            kl_dims = gaussian_kl_per_dim(out.mean, out.logvar).double()
            per_image = {"recon": recon, "kl": kl_dims.sum(1), "loss": recon + kl_dims.sum(1)}
            per_image.update({f"kl_dim_{i}": kl_dims[:, i] for i in range(kl_dims.shape[1])})
            for name, values in per_image.items():
                sums[name] = sums.get(name, 0.0) + float(values.sum())
    means = {name: total / len(images) for name, total in sums.items()}
    means["nelbo"] = means["recon"] + means["kl"]
    means["active_units"] = float(sum(means[f"kl_dim_{i}"] > 0.01 for i in range(model.latent_dim)))
    return means


def weights_of(checkpoint: str | Path) -> VAE:
    """The test's model (latent 4, hidden [16]) with a checkpoint's weights, in evaluation mode."""
    model = VAE(latent_dim=4, hidden_dims=[16], sample_latent=False)
    model.load_state_dict(read_checkpoint(checkpoint)["state_dict"])
    return model.eval()


class ScrambleLastEpoch(pl.Callback):
    """Spoils the weights as the last epoch starts, so the best checkpoint is the first epoch's, not the last."""

    def on_train_epoch_start(self, trainer: pl.Trainer, module: pl.LightningModule) -> None:
        if trainer.current_epoch == trainer.max_epochs - 1:
            with torch.no_grad():
                module.decoder[-2].bias.add_(6.0)  # every pixel's logit +6: far worse reconstructions


class RecordTrainLosses:
    """The loss and image count of every training step, by epoch, read as each step ends (a step, not a
    training_step call: under fit.steps_per_call a call takes several batches)."""

    def __init__(self, monkeypatch) -> None:
        self.by_epoch: dict[int, list[tuple[float, int]]] = {}
        train_on = TrainingSteps._train_on

        def recorded(model, x):
            loss = train_on(model, x)
            self.by_epoch.setdefault(model.current_epoch, []).append((float(loss), len(x)))
            return loss

        monkeypatch.setattr(TrainingSteps, "_train_on", recorded)


def test_logged_epoch_metrics_recomputed_by_hand(tmp_path: Path, tracking_uri: str, monkeypatch) -> None:
    """400 val images in batches of 128 (a last batch of 16); test/ from the best checkpoint, not the last; the
    training steps in runs of 8 batches a call (the default), each step's loss read as it ends."""
    record = RecordTrainLosses(monkeypatch)
    config = parse_config(
        [
            "--config", DEMO, "--model.hidden_dims", "[16]", "--model.sample_latent", "false",
            "--trainer.max_epochs", "2", "--trainer.enable_progress_bar", "false",
            "--trainer.enable_model_summary", "false", "--analysis.enabled", "false",
            "--tracking.uri", tracking_uri, "--fit.checkpoint_dir", str(tmp_path / "ckpt"),
        ]  # fmt: skip
    )
    result = run_training(config, callbacks=[ScrambleLastEpoch()])
    assert result.datamodule.steps_per_call == 8
    client = MlflowClient(tracking_uri)
    logged = client.get_run(result.run_id).data.metrics
    history = {m.step: m.value for m in client.get_metric_history(result.run_id, "val/loss")}
    assert len(history) == 2 and history[1] > history[0] + 50  # the scrambled last epoch is the worse one

    for epoch, losses in record.by_epoch.items():  # 3600 training images: 28 batches of 128 and one of 16
        assert [n for _, n in losses] == [128] * 28 + [16]
        by_hand = sum(loss * n for loss, n in losses) / 3600
        (value,) = [m.value for m in client.get_metric_history(result.run_id, "train/loss") if m.step == epoch]
        assert value == pytest.approx(by_hand, rel=1e-6)

    data = result.datamodule
    best = weights_of(result.best_checkpoint)
    last = weights_of(Path(result.best_checkpoint).with_name("last.ckpt"))  # result.model holds the best weights
    assert epoch_means(best, data.splits["val"].images.float() / 255)["loss"] == pytest.approx(history[0], rel=1e-5)
    val_last = epoch_means(last, data.splits["val"].images.float() / 255)
    test_best = epoch_means(best, data.splits["test"].images.float() / 255)
    for name, value in val_last.items():
        assert logged[f"val/{name}"] == pytest.approx(value, rel=1e-5, abs=1e-6), name
    for name, value in test_best.items():
        assert logged[f"test/{name}"] == pytest.approx(value, rel=1e-5, abs=1e-6), name
    assert epoch_means(last, data.splits["test"].images.float() / 255)["loss"] > test_best["loss"] + 50


def test_binarization_draws_fresh_pixels_for_every_training_batch() -> None:
    def training_batches(seed: int) -> list[Tensor]:
        seen: list[Tensor] = []

        class Recording(VAE):
            def training_step(self, batch, batch_idx):
                seen.append(batch[0].clone())
                return super().training_step(batch, batch_idx)

        pl.seed_everything(seed, verbose=False)
        data = ImageDataModule(source="mnist-5k", batch_size=8, binarize=True)
        data.splits = {  # eight grey images (every pixel 0.3) in each split: a batch holds all of them
            split: InMemoryImages(torch.full((8, 1, 28, 28), 0.3), torch.zeros(8, dtype=torch.long))
            for split in ("train", "val", "test")
        }
        trainer = pl.Trainer(
            max_epochs=2, limit_val_batches=0, logger=False, enable_checkpointing=False,
            enable_progress_bar=False, enable_model_summary=False,
        )  # fmt: skip
        trainer.fit(Recording(latent_dim=2, hidden_dims=[8]), datamodule=data)
        return seen

    first, second = training_batches(seed=0)
    for batch in (first, second):
        assert set(batch.unique().tolist()) == {0.0, 1.0}
        assert float(batch.mean()) == pytest.approx(0.3, abs=0.03)  # Bernoulli(0.3) draws, not a threshold
    assert not torch.equal(first, second)  # fresh draws for each batch
    again = training_batches(seed=0)
    assert torch.equal(again[0], first) and torch.equal(again[1], second)  # same seed, same draws
    assert not torch.equal(training_batches(seed=1)[0], first)


def test_kl_scores_and_active_units_by_hand() -> None:
    mean = np.array([[1.0, 0.0, 0.05], [-1.0, 0.0, -0.05]], dtype=np.float32)
    logvar = np.array([[0.0, 0.0, 0.0], [math.log(4.0), 0.0, 0.0]], dtype=np.float32)
    scores = kl_scores(Codes(z=mean, labels=np.zeros(2, dtype=np.int64), logvar=logvar, mean=mean))
    # KL of N(m, s2) from N(0, 1) = (m2 + s2 - 1 - log s2) / 2; dimension 0: (1 + 0) / 2 and (1 + 3 - log 4) / 2
    assert scores["kl_dim_0"] == pytest.approx((0.5 + (4.0 - math.log(4.0)) / 2) / 2, rel=1e-6)
    assert scores["kl_dim_1"] == 0.0
    assert scores["kl_dim_2"] == pytest.approx(0.05**2 / 2, rel=1e-4)  # 0.00125 nats: below the 0.01 threshold
    assert scores["active_units"] == 1.0


def test_probe_scores_read_digit_identity_from_the_codes() -> None:
    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(4), 30)
    centres = 10.0 * np.eye(4, dtype=np.float32)
    z = centres[labels] + rng.normal(size=(120, 4)).astype(np.float32)
    train, test = Codes(z=z[::2], labels=labels[::2]), Codes(z=z[1::2], labels=labels[1::2])
    assert probe_scores(train, test) == {"knn_acc": 1.0, "probe_acc": 1.0}
    test_flipped = Codes(z=test.z, labels=(test.labels + 1) % 4)  # every label wrong
    assert probe_scores(train, test_flipped) == {"knn_acc": 0.0, "probe_acc": 0.0}


def test_score_table_means_stds_and_paired_differences_by_hand() -> None:
    scores = {
        "ae": {0: {"knn_acc": 0.80}, 1: {"knn_acc": 0.90}, 2: {"knn_acc": 0.70}},
        "vae": {0: {"knn_acc": 0.85}, 1: {"knn_acc": 0.90}, 2: {"knn_acc": 0.80}},
    }
    (row,) = score_table(scores)
    assert row["score"] == "knn_acc" and row["seeds"] == 3
    assert row["ae_mean"] == pytest.approx(0.8) and row["ae_std"] == pytest.approx(0.1)  # sample std (n - 1)
    assert row["vae_mean"] == pytest.approx(0.85) and row["vae_std"] == pytest.approx(0.05)
    differences = [0.05, 0.0, 0.10]
    assert row["vae-ae_mean"] == pytest.approx(0.05) and row["vae-ae_std"] == pytest.approx(0.05)
    t = 0.05 / (0.05 / math.sqrt(3))  # paired t with 2 degrees of freedom: p = 1 - t / sqrt(t^2 + 2)
    assert row["vae-ae_p"] == pytest.approx(1 - t / math.sqrt(t**2 + 2), rel=1e-9)
    assert mean_std([3.0]) == (3.0, 0.0)
    assert mean_std([1.0, 3.0]) == (2.0, pytest.approx(math.sqrt(2.0)))  # two seeds have a spread
    assert paired_p(differences[:1]) is None and paired_p([0.0, 0.0]) == 1.0 and paired_p([0.2, 0.2]) == 0.0


def test_score_table_leaves_a_score_one_variant_lacks_unpaired() -> None:
    """AEs have no active_units: the VAE's mean is reported, no difference and no p-value are made up."""
    scores = {
        "ae": {0: {"knn_acc": 0.8}, 1: {"knn_acc": 0.9}},
        "vae": {0: {"knn_acc": 0.8, "active_units": 3.0}, 1: {"knn_acc": 0.9, "active_units": 5.0}},
    }
    rows = {row["score"]: row for row in score_table(scores)}
    units = rows["active_units"]
    assert units["ae_mean"] is None and units["vae_mean"] == 4.0
    assert units["vae-ae_mean"] is None and units["vae-ae_std"] is None and units["vae-ae_p"] is None
    assert rows["knn_acc"]["vae-ae_mean"] == 0.0 and rows["knn_acc"]["vae-ae_p"] == 1.0


class Remembered(Logger):
    """A Lightning logger that keeps the names of the metrics sent to it."""

    name, version = "remembered", 0

    def __init__(self) -> None:
        super().__init__()
        self.sent: set[str] = set()

    def log_hyperparams(self, params, *args, **kwargs) -> None:
        pass

    def log_metrics(self, metrics, step=None) -> None:
        self.sent.update(metrics)


def test_epoch_metrics_of_uneven_batches_by_hand() -> None:
    """A small fit (10 / 7 / 1 images in batches of 4: short last batches) whose weights lr 1e-12 holds still, so
    every train/*, val/* and test/* is the per-image mean of the final weights over its split. Fast: the mutation
    run's guard of the epoch sums (`_accumulate`, `_log_epoch`)."""
    torch.manual_seed(0)
    sizes = {"train": 10, "val": 7, "test": 1}  # a split of one image is still logged
    data = ImageDataModule(source="mnist-5k", batch_size=4)
    data.splits = {
        split: InMemoryImages(torch.randint(0, 256, (n, 1, 28, 28), dtype=torch.uint8), torch.zeros(n, dtype=torch.long))
        for split, n in sizes.items()
    }
    model = VAE(latent_dim=3, hidden_dims=[8], sample_latent=False, lr=1e-12)
    with torch.no_grad():  # the same q(z|x) for every image: KL 1.125, 0.005 (inactive) and 0.153 nats a dimension
        model.encoder[-1].weight.zero_()
        model.encoder[-1].bias.copy_(torch.tensor([1.5, 0.1, 0.0, 0.0, 0.0, math.log(2.0)]))
    model.nonfinite_policy = "skip"  # fit.on_nonfinite skip: train/skipped_batches is logged too (0 here)
    logger = Remembered()
    trainer = pl.Trainer(
        max_epochs=2, logger=logger, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, num_sanity_val_steps=0,
    )  # fmt: skip
    trainer.fit(model, datamodule=data)
    fitted = dict(trainer.callback_metrics)
    assert set(trainer.progress_bar_metrics) == {"val_loss"}  # the bar shows val_loss alone, MLflow never
    assert "val_loss" not in logger.sent and {"val/loss", "train/loss"} <= logger.sent
    trainer.test(model, datamodule=data, verbose=False)
    logged = {**fitted, **trainer.callback_metrics}
    model.eval()
    expected: dict[str, float] = {}
    for split in sizes:
        means = epoch_means(model, data.splits[split].images.float() / 255, batch_size=4)
        means["bpd"] = means["nelbo"] / (28 * 28 * math.log(2))
        expected.update({f"{split}/{name}": value for name, value in means.items()})
    expected["val_loss"] = expected["val/loss"]
    expected["train/skipped_batches"] = 0.0
    expected["step"] = 2.0  # trainer.test, after two epochs, logs current_epoch 2
    assert expected["val/active_units"] == 2.0 and expected["val/kl_dim_1"] == pytest.approx(0.005)
    assert set(logged) == set(expected)
    for name, value in expected.items():
        assert float(logged[name]) == pytest.approx(value, rel=1e-5, abs=1e-6), name
    assert float(fitted["step"]) == 1.0  # the last epoch fitted


def test_ae_loss_is_the_mean_bernoulli_nll_by_hand() -> None:
    torch.manual_seed(0)
    ae = AE(latent_dim=3, hidden_dims=[8])
    x = torch.rand(5, 1, 28, 28).double()
    out = ae(x.float())
    logits = out.recon_logits.double()
    # -log p(x|z) summed over pixels: -(x log sigmoid(l) + (1 - x) log(1 - sigmoid(l))), then the batch mean
    by_hand = -(x * torch.log(torch.sigmoid(logits)) + (1 - x) * torch.log(1 - torch.sigmoid(logits))).sum((1, 2, 3))
    terms = ae.loss_terms(x.float(), out)
    assert float(terms.loss) == pytest.approx(float(by_hand.mean()), rel=1e-5)
    assert float(terms.reconstruction) == pytest.approx(float(by_hand.mean()), rel=1e-5)
    assert terms.kl.shape == () and float(terms.kl) == 0.0
    assert torch.equal(terms.kl_per_dim, torch.zeros(3))


def test_vae_samples_z_from_its_posterior() -> None:
    vae = VAE(latent_dim=1, hidden_dims=[4])
    vae.encoder = FixedPosterior(0.5, math.log(0.25))  # q(z|x) = N(0.5, 0.5^2)
    torch.manual_seed(0)
    z = vae(torch.rand(20_000, 1, 28, 28)).z.double()
    assert float(z.mean()) == pytest.approx(0.5, abs=0.02) and float(z.std()) == pytest.approx(0.5, abs=0.02)


def test_vae_training_loss_weighs_kl_by_the_warmup_beta() -> None:
    """In a training step the KL is weighted by beta now (warm-up); in evaluation by kl_weight."""
    torch.manual_seed(0)
    vae = VAE(latent_dim=2, hidden_dims=[8], kl_weight=1.0, sample_latent=False)
    vae.trainer = pl.Trainer(logger=False, enable_progress_bar=False, enable_model_summary=False)
    vae.beta_now.fill_(0.25)
    with torch.no_grad():
        vae.encoder[-1].bias[:2].fill_(2.0)  # posterior means near 2: about 4 nats of KL
    x = torch.rand(6, 1, 28, 28)
    terms = vae.train().loss_terms(x, vae(x))
    assert float(terms.loss) == pytest.approx(float(terms.reconstruction + 0.25 * terms.kl), rel=1e-6)
    terms = vae.eval().loss_terms(x, vae(x))
    assert float(terms.loss) == pytest.approx(float(terms.reconstruction + terms.kl), rel=1e-6)
    assert float(terms.kl) > 1.0  # the two weights give losses apart

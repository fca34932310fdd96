"""The math of the models: KL, ELBO pieces, shapes, IWAE, warm-up, AE/VAE equivalence."""

from __future__ import annotations

import math

import lightning.pytorch as pl
import pytest
import torch

from aevae.data import ImageDataModule
from aevae.errors import UsageError
from aevae.models import AE, VAE, gaussian_kl_per_dim, kl_warmup, reconstruction_nll


def test_kl_closed_form_matches_monte_carlo() -> None:
    torch.manual_seed(0)
    mean, logvar = torch.tensor([[0.7, -1.2, 0.0]]), torch.tensor([[-0.5, 0.8, 0.0]])
    std = (0.5 * logvar).exp()
    z = mean + std * torch.randn(400_000, 3)
    log_q = torch.distributions.Normal(mean, std).log_prob(z)
    log_p = torch.distributions.Normal(0.0, 1.0).log_prob(z)
    monte_carlo = (log_q - log_p).mean(0)
    closed = gaussian_kl_per_dim(mean, logvar)[0]
    assert torch.allclose(closed, monte_carlo, atol=0.01)
    assert closed[2].item() == 0.0  # N(0, 1) against the prior


def test_bernoulli_reconstruction_hand_computed() -> None:
    x = torch.zeros(2, 1, 28, 28)
    x[1] = 1.0
    logits = torch.zeros(2, 1, 28, 28)  # p = 0.5 everywhere: log 2 nats per pixel
    assert torch.allclose(reconstruction_nll(logits, x, "bernoulli"), torch.full((2,), 784 * math.log(2)))
    logits = torch.full((1, 1, 28, 28), math.log(3.0))  # p = 0.75, x = 1: -log 0.75 per pixel
    nll = reconstruction_nll(logits, torch.ones(1, 1, 28, 28), "bernoulli")
    assert nll.item() == pytest.approx(-784 * math.log(0.75), rel=1e-5)


def test_gaussian_reconstruction_hand_computed() -> None:
    x = torch.full((1, 1, 28, 28), 0.5)
    nll = reconstruction_nll(torch.zeros(1, 1, 28, 28), x, "gaussian")  # sigmoid(0) = 0.5 = x
    assert nll.item() == pytest.approx(784 * 0.5 * math.log(2 * math.pi), rel=1e-6)


def test_vae_loss_is_reconstruction_plus_beta_kl() -> None:
    model = VAE(latent_dim=3, hidden_dims=[16], kl_weight=0.25)
    x = torch.rand(5, 1, 28, 28)
    out = model(x)
    terms = model.loss_terms(x, out)
    kl = gaussian_kl_per_dim(out.mean, out.logvar).sum(1).mean()
    recon = reconstruction_nll(out.recon_logits, x, "bernoulli").mean()
    assert terms.kl.item() == pytest.approx(kl.item(), rel=1e-6)
    assert terms.reconstruction.item() == pytest.approx(recon.item(), rel=1e-6)
    assert terms.loss.item() == pytest.approx(recon.item() + 0.25 * kl.item(), rel=1e-6)
    assert terms.kl_per_dim.shape == (3,)


@pytest.mark.parametrize("architecture,hidden", [("mlp", [64, 32]), ("mlp", [8]), ("conv", [8, 16, 32])])
@pytest.mark.parametrize("model_cls", [AE, VAE])
def test_shapes(model_cls, architecture: str, hidden: list[int]) -> None:
    model = model_cls(latent_dim=5, architecture=architecture, hidden_dims=hidden)
    x = torch.rand(7, 1, 28, 28)
    out = model(x)
    assert out.recon_logits.shape == (7, 1, 28, 28)
    assert out.z.shape == out.mean.shape == model.encode(x).shape == (7, 5)
    assert model.decode(torch.zeros(3, 5)).shape == (3, 1, 28, 28)
    assert (out.logvar is None) == (model_cls is AE)
    reconstruction = model.reconstruct(x)
    assert reconstruction.min() >= 0 and reconstruction.max() <= 1


def test_vae_without_kl_and_sampling_is_an_autoencoder() -> None:
    torch.manual_seed(0)
    vae = VAE(latent_dim=4, hidden_dims=[16], kl_weight=0.0, sample_latent=False).train()
    x = torch.rand(6, 1, 28, 28)
    out = vae(x)
    assert torch.equal(out.z, out.mean)  # decodes the mean, even in training
    terms = vae.loss_terms(x, out)
    assert terms.loss.item() == pytest.approx(terms.reconstruction.item())
    assert torch.equal(vae(x).recon_logits, out.recon_logits)  # deterministic like the AE


def test_vae_samples_in_training_and_evaluation() -> None:
    vae = VAE(latent_dim=4, hidden_dims=[16])
    x = torch.rand(6, 1, 28, 28)
    for mode in (vae.train, vae.eval):  # the ELBO is an expectation over q(z|x), also on val/test
        out = mode()(x)
        assert not torch.equal(out.z, out.mean)
    assert torch.equal(vae.encode(x), vae.forward_encoder(x)[0])  # codes are the posterior mean


def test_iwae_bound_is_tighter_than_elbo() -> None:
    torch.manual_seed(0)
    vae = VAE(latent_dim=2, hidden_dims=[32]).eval()
    x = torch.bernoulli(torch.rand(4, 1, 28, 28))
    single = torch.stack([vae.importance_sampled_nll(x, k=1) for _ in range(200)]).mean(0)
    many = vae.importance_sampled_nll(x, k=500, chunk=128)
    assert many.shape == (4,)
    assert (many < single).all()  # log-mean-exp of weights >= mean of logs (Jensen)
    with torch.no_grad():
        mean, logvar = vae.forward_encoder(x)
        analytic_kl = gaussian_kl_per_dim(mean, logvar).sum(1)
    assert torch.isfinite(many).all() and (analytic_kl >= 0).all()


def test_kl_warmup_is_linear_then_flat() -> None:
    assert kl_warmup(2.0, 0.0, 4) == 0.0
    assert kl_warmup(2.0, 1.5, 4) == pytest.approx(0.75)
    assert kl_warmup(2.0, 9.0, 4) == 2.0
    assert kl_warmup(2.0, 0.0, 0) == 2.0


def test_kl_warmup_applies_in_training_steps_only() -> None:
    betas: list[float] = []

    class RecordBeta(pl.Callback):
        def on_train_batch_start(self, trainer, module, batch, batch_idx) -> None:
            betas.append(module.beta())

    data = ImageDataModule(source="mnist-5k", batch_size=64)
    vae = VAE(latent_dim=2, hidden_dims=[8], kl_weight=1.0, kl_warmup_epochs=2)
    trainer = pl.Trainer(
        max_epochs=2, limit_train_batches=4, limit_val_batches=1, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, callbacks=[RecordBeta()],
    )  # fmt: skip
    trainer.fit(vae, datamodule=data)
    assert betas == pytest.approx([i / 8 for i in range(8)])  # 4 batches an epoch, over 2 epochs
    assert vae.eval().beta() == 1.0


@pytest.mark.parametrize(
    "kwargs,field",
    [
        ({"latent_dim": 0}, "model.latent_dim"),
        ({"latent_dim": 10**9}, "model.latent_dim"),
        ({"kl_weight": -1.0}, "model.kl_weight"),
        ({"lr": 0.0}, "model.lr"),
        ({"architecture": "conv", "hidden_dims": [8]}, "model.hidden_dims"),
        ({"likelihood": "poisson"}, "model.likelihood"),
    ],
)
def test_bad_model_arguments_name_the_field(kwargs: dict, field: str) -> None:
    with pytest.raises(UsageError, match=field):
        VAE(**kwargs)

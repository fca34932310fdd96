"""AE and VAE LightningModules sharing one base: same encoder/decoder families, loss terms and optimizer."""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from functools import partial
from typing import Any, Callable, Literal, Sequence

import lightning.pytorch as pl
import torch
from torch import Tensor, nn

from aevae.epoch_metrics import EpochMetrics
from aevae.errors import UsageError
from aevae.likelihoods import LIKELIHOODS, Likelihood, make_likelihood
from aevae.networks import ARCHITECTURES, networks
from aevae.step_runners import CompiledStep, CudaGraphStep, EagerStep
from aevae.step_record import StepRecord
from aevae.steps import TrainingSteps

DEFAULT_IMAGE_SHAPE = (1, 28, 28)  # a model built without data (tests, notebooks); training takes the data's
MAX_LATENT_DIM = 4096
TRAINING_BYTES_PER_PARAMETER = 16  # float32 weight, its gradient and Adam's two moments


@dataclass
class ModelOutput:
    """What every model returns for a batch of images (pythae-style: one type for all models)."""

    recon_logits: Tensor  # [B, C * params_per_channel, H, W] the decoder's output: the likelihood's parameters
    z: Tensor  # the code that was decoded: AE code, or VAE sample (posterior mean without sampling)
    mean: Tensor  # deterministic code: AE code, VAE posterior mean
    logvar: Tensor | None  # VAE posterior log-variance; None for the AE


@dataclass
class LossTerms:
    """Batch means, in nats per image; kl_per_dim has one entry per latent dimension."""

    loss: Tensor
    reconstruction: Tensor
    kl: Tensor
    kl_per_dim: Tensor


def check_memory(build: Callable[[], tuple[nn.Module, ...]], hidden_dims: list[int]) -> None:
    """Count the parameters on the meta device (no memory taken) and refuse a model this machine cannot train:
    65536-wide layers are each allowed, but two of them would make billions of weights."""
    with torch.device("meta"):
        count = sum(p.numel() for module in build() for p in module.parameters())
    need = TRAINING_BYTES_PER_PARAMETER * count
    have = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    if need > have:
        raise UsageError(
            f"model.hidden_dims: {hidden_dims} makes {count:,} parameters, about {need / 2**30:.0f} GiB to train; "
            f"this machine has {have / 2**30:.0f} GiB"
        )


def reconstruction_nll(params: Tensor, x: Tensor, likelihood: str | Likelihood) -> Tensor:
    """-log p(x|z) per image, summed over pixels, in nats (a likelihood name takes its defaults)."""
    if isinstance(likelihood, str):
        likelihood = make_likelihood(likelihood, x.shape[1])
    return likelihood.nll(params, x)


def check_image_shape(image_shape: Sequence[int]) -> tuple[int, int, int]:
    shape = tuple(int(n) for n in image_shape)
    if len(shape) != 3 or any(n < 1 for n in shape) or shape[0] > 4:
        raise UsageError(f"model.image_shape must be [channels 1..4, height, width], got {list(image_shape)}")
    return shape


def gaussian_kl_per_dim(mean: Tensor, logvar: Tensor) -> Tensor:
    """KL(N(mean, exp(logvar)) || N(0, I)) per sample and dimension, closed form."""
    return 0.5 * (mean.pow(2) + logvar.exp() - 1.0 - logvar)


def kl_warmup(kl_weight: float, epochs_done: float, warmup_epochs: int) -> float:
    """Linear warm-up of beta from 0 to kl_weight over warmup_epochs (0: no warm-up)."""
    if warmup_epochs == 0:
        return kl_weight
    return kl_weight * min(1.0, epochs_done / warmup_epochs)


class LatentAutoencoder(TrainingSteps, EpochMetrics, pl.LightningModule):
    """Shared base of AE and VAE: architecture, likelihood, optimizer; its training step (aevae.steps) and what an
    epoch reports (aevae.epoch_metrics) are mixed in.

    Args:
        latent_dim: size of the code z.
        architecture: ``mlp`` (hidden_dims are layer widths) or ``conv`` (hidden_dims are the channels of each
            stride-2 convolution, then the dense width: [32, 64, 256] takes 28x28 to 7x7).
        hidden_dims: encoder widths from the image inwards; the decoder mirrors them.
        likelihood: ``bernoulli`` (BCE on logits), ``gaussian`` (scale ``likelihood_scale``),
            ``gaussian-learned`` (one learned scale per channel, starting at ``likelihood_scale``) or
            ``logistic`` (discretized logistic over the 256 levels of 8-bit pixels, mean and scale per pixel).
        likelihood_scale: the Gaussian's standard deviation (fixed, or the learned one's start).
        image_shape: [channels, height, width] of the images; training sets it from the data, and it is saved
            with the model, so a checkpoint rebuilds without the data. None: [1, 28, 28].
        lr: Adam learning rate.
        weight_decay: Adam weight decay.
    """

    def __init__(
        self,
        latent_dim: int = 4,
        architecture: Literal["mlp", "conv"] = "mlp",
        hidden_dims: list[int] = [512, 256],
        likelihood: Literal["bernoulli", "gaussian", "gaussian-learned", "logistic"] = "bernoulli",
        lr: float = 1e-3,
        weight_decay: float = 0.0,
        likelihood_scale: float = 1.0,
        image_shape: list[int] | None = None,
    ) -> None:
        super().__init__()
        if not 1 <= latent_dim <= MAX_LATENT_DIM:
            raise UsageError(f"model.latent_dim must be in 1..{MAX_LATENT_DIM}, got {latent_dim}")
        if architecture not in ARCHITECTURES:
            raise UsageError(f"model.architecture: unknown {architecture!r}; choose mlp or conv")
        if architecture == "conv" and len(hidden_dims) < 2:
            raise UsageError(f"model.hidden_dims: conv takes [channels per stride-2 stage..., dense], got {hidden_dims}")
        if any(h < 1 or h > 65536 for h in hidden_dims):
            raise UsageError(f"model.hidden_dims must be widths in 1..65536, got {hidden_dims}")
        if not (lr > 0 and math.isfinite(lr)):
            raise UsageError(f"model.lr must be a finite number > 0, got {lr}")
        if weight_decay < 0:
            raise UsageError(f"model.weight_decay must be >= 0, got {weight_decay}")
        if likelihood not in LIKELIHOODS:
            raise UsageError(f"model.likelihood: unknown {likelihood!r}; choose one of {', '.join(LIKELIHOODS)}")
        if not (likelihood_scale > 0 and math.isfinite(likelihood_scale)):
            raise UsageError(f"model.likelihood_scale must be a finite number > 0, got {likelihood_scale}")
        shape = check_image_shape(DEFAULT_IMAGE_SHAPE if image_shape is None else image_shape)
        self.save_hyperparameters()
        self.hparams.image_shape = list(shape)  # saved resolved, so a checkpoint rebuilds the same networks
        self.image_shape = shape
        self.latent_dim = latent_dim
        self.likelihood = likelihood
        self.observation = make_likelihood(likelihood, shape[0], likelihood_scale)
        self.lr = lr
        self.weight_decay = weight_decay
        out_channels = shape[0] * self.observation.params_per_channel
        build = partial(networks, architecture, hidden_dims, self.encoder_outputs(), latent_dim, shape, out_channels)
        check_memory(build, hidden_dims)
        self.encoder, self.decoder = build()
        self._epoch_sums: dict[str, Tensor] = {}  # validation and test
        self.record = StepRecord(3 + latent_dim)  # training: loss, recon, kl, kl per dimension
        self.register_buffer("beta_now", torch.ones(()), persistent=False)  # read by the (captured) step
        self.register_buffer("found_inf", torch.zeros(()), persistent=False)  # skip: read by the fused optimizer
        self.nonfinite_policy = "stop"  # the trainer factory sets fit.on_nonfinite here
        self.compile_mode = "none"  # and fit.compile here
        self.step_runner: EagerStep | CompiledStep | CudaGraphStep | None = None
        self.check_every = 1
        self.bar_loss: float | None = None  # the loss the progress bar shows, read every BAR_EVERY steps
        self._bar_shown = False  # whether the trainer shows a progress bar (set at the start of training)
        self._held_val: tuple[int, dict[str, float]] | None = None  # an epoch's val metrics, written with its train's
        self._beta_filled: float | None = None
        self._batch_in_epoch: int | None = None  # inside a BatchRun (fit.steps_per_call): the batch's index in its epoch
        self._batches_per_epoch = 1

    # --- what a subclass defines -------------------------------------------------------
    kind = "base"

    def encoder_outputs(self) -> int:
        raise NotImplementedError

    def forward(self, x: Tensor) -> ModelOutput:
        raise NotImplementedError

    def beta(self) -> float:
        """The KL weight now (the AE has none)."""
        return 0.0

    def loss_terms(self, x: Tensor, out: ModelOutput) -> LossTerms:
        raise NotImplementedError

    # --- shared ------------------------------------------------------------------------
    def encode(self, x: Tensor) -> Tensor:
        """The deterministic code of each image (AE: z, VAE: posterior mean)."""
        return self.forward_encoder(x)[0]

    def forward_encoder(self, x: Tensor) -> tuple[Tensor, Tensor | None]:
        raise NotImplementedError

    def decode(self, z: Tensor) -> Tensor:
        """The decoder's output for codes z: the likelihood's parameters [B, C * params_per_channel, H, W]."""
        return self.decoder(z)

    def decode_mean(self, z: Tensor) -> Tensor:
        """Mean images [B, C, H, W] in [0, 1] of p(x | z)."""
        return self.observation.mean(self.decode(z))

    def reconstruct(self, x: Tensor) -> Tensor:
        """Mean images in [0, 1] decoded from the deterministic codes."""
        return self.decode_mean(self.encode(x))

    @staticmethod
    def _summary(terms: LossTerms) -> Tensor:
        return torch.cat([torch.stack([terms.loss, terms.reconstruction, terms.kl]), terms.kl_per_dim])

    def configure_optimizers(self) -> torch.optim.Optimizer:
        # PyTorch's fused Adam kernel (CPU and CUDA) takes a third of the time of the default per-tensor loop.
        fused = self.device.type in ("cpu", "cuda")
        capturable = self.compile_mode == "cudagraph"  # its step counts live on the device, as capture needs
        return torch.optim.Adam(
            self.parameters(), lr=self.lr, weight_decay=self.weight_decay, fused=fused, capturable=capturable
        )


class AE(LatentAutoencoder):
    """Deterministic autoencoder: z = encoder(x), loss = -log p(x | z)."""

    kind = "ae"

    def encoder_outputs(self) -> int:
        return self.latent_dim

    def forward_encoder(self, x: Tensor) -> tuple[Tensor, None]:
        return self.encoder(x), None

    def forward(self, x: Tensor) -> ModelOutput:
        z, _ = self.forward_encoder(x)
        return ModelOutput(recon_logits=self.decode(z), z=z, mean=z, logvar=None)

    def loss_terms(self, x: Tensor, out: ModelOutput) -> LossTerms:
        reconstruction = self.observation.nll(out.recon_logits, x).mean()
        zero = reconstruction.new_zeros(())
        return LossTerms(reconstruction, reconstruction, zero, reconstruction.new_zeros(self.latent_dim))


class VAE(LatentAutoencoder):
    """Gaussian VAE: q(z|x) = N(mean, exp(logvar)), prior N(0, I), loss = -log p(x|z) + beta * KL.

    Takes every argument of LatentAutoencoder, and:

    Args:
        kl_weight: beta, the weight of the KL term (1 gives the ELBO; 0 with sample_latent=False is an AE).
        kl_warmup_epochs: ramp beta linearly from 0 over this many epochs (0: no warm-up).
        sample_latent: decode a reparameterized sample (training and evaluation); False decodes the mean.
    """

    kind = "vae"

    def __init__(
        self, kl_weight: float = 1.0, kl_warmup_epochs: int = 0, sample_latent: bool = True, **kwargs: Any
    ) -> None:
        if kl_weight < 0 or not math.isfinite(kl_weight):
            raise UsageError(f"model.kl_weight must be a finite number >= 0, got {kl_weight}")
        if kl_warmup_epochs < 0:
            raise UsageError(f"model.kl_warmup_epochs must be >= 0, got {kl_warmup_epochs}")
        super().__init__(**kwargs)  # the shared architecture, likelihood and optimizer arguments
        self.kl_weight = kl_weight
        self.kl_warmup_epochs = kl_warmup_epochs
        self.sample_latent = sample_latent

    def encoder_outputs(self) -> int:
        return 2 * self.latent_dim

    def forward_encoder(self, x: Tensor) -> tuple[Tensor, Tensor]:
        mean, logvar = self.encoder(x).chunk(2, dim=1)
        return mean, logvar

    def forward(self, x: Tensor) -> ModelOutput:
        mean, logvar = self.forward_encoder(x)
        # Sampled in evaluation too: the ELBO is an expectation over q(z|x), and decoding the mean would
        # understate val/test nelbo. encode() and the analysis use the mean.
        z = mean + torch.randn_like(mean) * (0.5 * logvar).exp() if self.sample_latent else mean
        return ModelOutput(recon_logits=self.decode(z), z=z, mean=mean, logvar=logvar)

    def beta(self) -> float:
        """The KL weight now: ramped over the first kl_warmup_epochs of training, full otherwise."""
        if not self.training or self._trainer is None:
            return self.kl_weight
        return kl_warmup(self.kl_weight, self.epochs_done(), self.kl_warmup_epochs)

    def loss_terms(self, x: Tensor, out: ModelOutput) -> LossTerms:
        reconstruction = self.observation.nll(out.recon_logits, x).mean()
        kl_per_dim = gaussian_kl_per_dim(out.mean, out.logvar).mean(0)
        kl = kl_per_dim.sum()
        beta = self.beta_now if self.training and self._trainer is not None else self.kl_weight
        return LossTerms(reconstruction + beta * kl, reconstruction, kl, kl_per_dim)

    @torch.no_grad()
    def importance_sampled_nll(self, x: Tensor, k: int = 100, chunk: int = 100) -> Tensor:
        """-log p(x) per image, estimated by the IWAE bound with k importance samples (nats).

        log p(x) >= log (1/k) sum_i p(x|z_i) p(z_i) / q(z_i|x), z_i ~ q(z|x); tight as k grows.
        """
        mean, logvar = self.forward_encoder(x)
        std = (0.5 * logvar).exp()
        log_weights = []
        for start in range(0, k, chunk):
            n = min(chunk, k - start)
            eps = torch.randn(n, *mean.shape, device=mean.device, dtype=mean.dtype)
            z = mean + std * eps  # [n, B, D]
            logits = self.decode(z.flatten(0, 1))
            log_px_z = -self.observation.nll(logits, x.repeat(n, 1, 1, 1)).view(n, -1)
            log_pz = -0.5 * (z.pow(2) + math.log(2 * math.pi)).sum(-1)
            log_qz_x = -0.5 * (eps.pow(2) + logvar + math.log(2 * math.pi)).sum(-1)
            log_weights.append(log_px_z + log_pz - log_qz_x)
        return -(torch.logsumexp(torch.cat(log_weights), dim=0) - math.log(k))

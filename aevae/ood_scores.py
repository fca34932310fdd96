"""Per-image out-of-distribution scores of a trained AE or VAE (higher = more out of distribution).

- ``recon``: -log p(x | z) at the deterministic code (AE and VAE), the classic autoencoder anomaly score.
- ``nelbo``: the negative ELBO, -E_q[log p(x|z)] + KL(q(z|x) || p(z)), averaged over ``elbo_samples`` draws (VAE).
- ``iwae``: -log p(x) estimated with k importance samples (Burda et al. 2016), ``VAE.importance_sampled_nll``.
- ``mahalanobis``: Mahalanobis distance of the code to a Gaussian fitted on the training codes (AE and VAE).
- ``complexity``: the likelihood ratio against a universal background model of Serra et al. 2020
  ("Input complexity and out-of-distribution detection with likelihood-based generative models", ICLR):
  S(x) = -log2 p(x) - L(x), with L(x) the bits of the image compressed losslessly as a PNG. It corrects the
  failure of Nalisnick et al. 2019 (simple images get high likelihood) by discounting what any compressor
  already finds simple. The model's likelihood is the IWAE estimate (VAE) or the reconstruction term (AE).
"""

from __future__ import annotations

import io
import math
from typing import Sequence

import numpy as np
import torch
from torch import Tensor

from aevae.errors import UsageError
from aevae.models import LatentAutoencoder, gaussian_kl_per_dim

SCORES = ("recon", "nelbo", "iwae", "mahalanobis", "complexity")
VAE_ONLY = ("nelbo", "iwae")
ELBO_SAMPLES = 10


def scores_for(kind: str) -> tuple[str, ...]:
    """The scores a model kind can give."""
    return SCORES if kind == "vae" else tuple(s for s in SCORES if s not in VAE_ONLY)


def check_scores(kind: str, names: Sequence[str]) -> None:
    """Unknown scores, and an ELBO or IWAE score asked of an AE, are UsageErrors."""
    for name in names:
        if name not in SCORES:
            raise UsageError(f"scores: unknown score {name!r}; choose from {', '.join(SCORES)}")
        if name not in scores_for(kind):
            raise UsageError(f"scores: {name} needs a VAE (a likelihood); this run trained an {kind.upper()}")


def png_bits(images: Tensor) -> np.ndarray:
    """L(x): bits of each image quantized to 8 bits and compressed as a PNG (PIL, highest compression)."""
    from PIL import Image

    pixels = (images.squeeze(1).clamp(0, 1) * 255).round().to(torch.uint8).cpu().numpy()
    bits = np.empty(len(pixels))
    for i, image in enumerate(pixels):
        buffer = io.BytesIO()
        Image.fromarray(image, mode="L").save(buffer, format="PNG", optimize=True)
        bits[i] = 8 * buffer.tell()
    return bits


class LatentGaussian:
    """A Gaussian fitted to training codes; scores are Mahalanobis distances (not squared)."""

    def __init__(self, codes: np.ndarray) -> None:
        from sklearn.covariance import EmpiricalCovariance

        self.fit = EmpiricalCovariance().fit(codes.astype(np.float64))

    def distance(self, codes: np.ndarray) -> np.ndarray:
        return np.sqrt(self.fit.mahalanobis(codes.astype(np.float64)))


@torch.no_grad()
def batch_scores(model: LatentAutoencoder, x: Tensor, names: Sequence[str], k: int) -> dict[str, Tensor]:
    """Model-based scores of one batch, in nats (mahalanobis and complexity are added by `score_images`)."""
    mean, logvar = model.forward_encoder(x)
    out = {"code": mean}
    needed = set(names) | ({"iwae"} if "complexity" in names and model.kind == "vae" else set())
    if needed & {"recon", "complexity"}:
        out["recon"] = model.observation.nll(model.decode(mean), x)
    if "nelbo" in needed:
        kl = gaussian_kl_per_dim(mean, logvar).sum(1)
        std = (0.5 * logvar).exp()
        recon = [model.observation.nll(model.decode(mean + std * torch.randn_like(std)), x)
                 for _ in range(ELBO_SAMPLES)]  # fmt: skip
        out["nelbo"] = torch.stack(recon).mean(0) + kl
    if "iwae" in needed:
        out["iwae"] = model.importance_sampled_nll(x, k=k, chunk=min(k, 50))
    return out


def model_scores(
    model: LatentAutoencoder, images: Tensor, names: Sequence[str], k: int, batch_size: int = 200
) -> dict[str, np.ndarray]:
    """Model-based scores and the deterministic codes of all images, batch by batch, in eval mode."""
    was_training = model.training
    model.eval()
    parts: dict[str, list[Tensor]] = {}
    try:
        for batch in images.split(batch_size):
            for name, value in batch_scores(model, batch.to(model.device), names, k).items():
                parts.setdefault(name, []).append(value.float().cpu())
    finally:
        model.train(was_training)
    return {name: torch.cat(values).numpy() for name, values in parts.items()}


def score_images(
    model: LatentAutoencoder, images: Tensor, names: Sequence[str], k: int, latent: LatentGaussian, seed: int = 0
) -> dict[str, np.ndarray]:
    """Every requested score of every image, seeded (the ELBO and IWAE draws)."""
    torch.manual_seed(seed)
    raw = model_scores(model, images, names, k)
    scores = {name: raw[name] for name in names if name in raw}
    if "mahalanobis" in names:
        scores["mahalanobis"] = latent.distance(raw["code"])
    if "complexity" in names:
        likelihood = raw["iwae"] if model.kind == "vae" else raw["recon"]
        scores["complexity"] = likelihood / math.log(2) - png_bits(images)
    return {name: scores[name] for name in names}


def training_codes(model: LatentAutoencoder, images: Tensor, batch_size: int = 1000) -> np.ndarray:
    """Deterministic codes (AE code, VAE posterior mean) of the training images."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            return torch.cat([model.encode(b.to(model.device)).float().cpu() for b in images.split(batch_size)]).numpy()
    finally:
        model.train(was_training)

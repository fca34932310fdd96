"""p(x | z) for pixels in [0, 1]: Bernoulli, Gaussian (fixed or learned scale), discretized logistic for 8-bit.

Each one reads the decoder's output (``params_per_channel`` maps per image channel), gives -log p(x | z) per
image in nats, summed over pixels, and the mean image. ``bits_offset`` converts a negative ELBO into bits per
dimension on the 8-bit scale (see `bits_per_dim`).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

LIKELIHOODS = ("bernoulli", "gaussian", "gaussian-learned", "logistic")
HALF_BIN = 1.0 / 255.0  # half the width of one of 256 pixel levels on the [-1, 1] scale
MIN_LOG_SCALE = -7.0


class Likelihood(nn.Module):
    params_per_channel = 1
    bits_offset = 0.0  # bits per dimension to add to nats / (D ln 2): 0 for likelihoods of discrete pixels

    def nll(self, params: Tensor, x: Tensor) -> Tensor:
        raise NotImplementedError

    def mean(self, params: Tensor) -> Tensor:
        raise NotImplementedError


class Bernoulli(Likelihood):
    """Binary pixels (or grey ones read as probabilities); params are logits."""

    def nll(self, params: Tensor, x: Tensor) -> Tensor:
        return F.binary_cross_entropy_with_logits(params, x, reduction="none").flatten(1).sum(1)

    def mean(self, params: Tensor) -> Tensor:
        return torch.sigmoid(params)


class Gaussian(Likelihood):
    """N(x; sigmoid(params), scale^2) per pixel; with ``learned`` one log-scale per channel is trained.

    A density over continuous pixels: converted to 8-bit bits per dimension by adding log2(256) = 8
    (the uniform dequantization bound).
    """

    bits_offset = 8.0

    def __init__(self, channels: int, scale: float = 1.0, learned: bool = False) -> None:
        super().__init__()
        log_scale = torch.full((channels, 1, 1), math.log(scale))
        if learned:
            self.log_scale = nn.Parameter(log_scale)
        else:
            self.register_buffer("log_scale", log_scale, persistent=False)

    def nll(self, params: Tensor, x: Tensor) -> Tensor:
        log_scale = self.log_scale.to(params.dtype)
        z = (x - torch.sigmoid(params)) * torch.exp(-log_scale)
        per_pixel = 0.5 * z.pow(2) + log_scale + 0.5 * math.log(2 * math.pi)
        return per_pixel.flatten(1).sum(1)

    def mean(self, params: Tensor) -> Tensor:
        return torch.sigmoid(params)


class DiscretizedLogistic(Likelihood):
    """The mass of 256 pixel levels under a logistic per pixel (PixelCNN++, one component): x in [0, 1] is
    mapped to [-1, 1]; the end levels take the tails. params: a mean and a log-scale map per channel."""

    params_per_channel = 2

    def split(self, params: Tensor) -> tuple[Tensor, Tensor]:
        mean, log_scale = params.chunk(2, dim=1)
        return mean, log_scale.clamp(min=MIN_LOG_SCALE)

    def log_prob(self, params: Tensor, x: Tensor) -> Tensor:
        mean, log_scale = self.split(params)
        centred = 2.0 * x - 1.0 - mean
        inv_scale = torch.exp(-log_scale)
        upper = inv_scale * (centred + HALF_BIN)
        lower = inv_scale * (centred - HALF_BIN)
        log_cdf_upper = upper - F.softplus(upper)  # log sigmoid: mass of the lowest level
        log_survival_lower = -F.softplus(lower)  # log (1 - sigmoid): mass of the highest level
        mass = torch.sigmoid(upper) - torch.sigmoid(lower)
        middle = inv_scale * centred
        log_density = middle - log_scale - 2.0 * F.softplus(middle) + math.log(HALF_BIN * 2)  # tiny masses
        log_mass = torch.where(mass > 1e-5, torch.log(mass.clamp(min=1e-12)), log_density)
        scaled = 2.0 * x - 1.0
        return torch.where(scaled < -0.999, log_cdf_upper, torch.where(scaled > 0.999, log_survival_lower, log_mass))

    def nll(self, params: Tensor, x: Tensor) -> Tensor:
        return -self.log_prob(params, x).flatten(1).sum(1)

    def mean(self, params: Tensor) -> Tensor:
        return ((self.split(params)[0] + 1.0) / 2.0).clamp(0.0, 1.0)


def make_likelihood(name: str, channels: int, scale: float = 1.0) -> Likelihood:
    if name == "bernoulli":
        return Bernoulli()
    if name in ("gaussian", "gaussian-learned"):
        return Gaussian(channels, scale, learned=name == "gaussian-learned")
    return DiscretizedLogistic()


def bits_per_dim(nats_per_image: Tensor, dims: int, likelihood: Likelihood) -> Tensor:
    """A negative log-likelihood (or its bound) per image as bits per pixel channel on the 8-bit scale."""
    return nats_per_image / (dims * math.log(2)) + likelihood.bits_offset

"""Encoders and decoders built for an image shape (C, H, W): an MLP, or stride-2 convolutions to a small map."""

from __future__ import annotations

import math

from torch import nn

from aevae.errors import UsageError

ImageShape = tuple[int, int, int]


def mlp_encoder(hidden_dims: list[int], out_dim: int, image_shape: ImageShape) -> nn.Sequential:
    layers: list[nn.Module] = [nn.Flatten()]
    width = math.prod(image_shape)
    for hidden in hidden_dims:
        layers += [nn.Linear(width, hidden), nn.ReLU()]
        width = hidden
    return nn.Sequential(*layers, nn.Linear(width, out_dim))


def mlp_decoder(hidden_dims: list[int], latent_dim: int, image_shape: ImageShape, out_channels: int) -> nn.Sequential:
    layers: list[nn.Module] = []
    width = latent_dim
    for hidden in reversed(hidden_dims):
        layers += [nn.Linear(width, hidden), nn.ReLU()]
        width = hidden
    out_shape = (out_channels, *image_shape[1:])
    return nn.Sequential(*layers, nn.Linear(width, math.prod(out_shape)), nn.Unflatten(1, out_shape))


def feature_sizes(image_shape: ImageShape, stages: int) -> list[tuple[int, int]]:
    """(height, width) before each stride-2 stage and after the last: 28x28 -> 14x14 -> 7x7, 64 -> ... -> 4."""
    sizes = [tuple(image_shape[1:])]
    for _ in range(stages):
        height, width = sizes[-1]
        if min(height, width) < 2:
            raise UsageError(
                f"model.hidden_dims: {stages} stride-2 conv stages halve a {image_shape[1]}x{image_shape[2]} image "
                f"below one pixel; give at most {len(sizes) - 1} channel widths before the dense width"
            )
        sizes.append((height // 2, width // 2))  # kernel 4, stride 2, padding 1 halves (rounding down)
    return sizes


def conv_encoder(hidden_dims: list[int], out_dim: int, image_shape: ImageShape) -> nn.Sequential:
    """One stride-2 convolution per channel width in hidden_dims[:-1], then a dense layer of hidden_dims[-1].

    [32, 64, 256] on 28x28: 28 -> 14 -> 7, dense 256; [32, 64, 128, 256, 512] on 64x64: 64 -> ... -> 4x4.
    """
    *channels, dense = hidden_dims
    height, width = feature_sizes(image_shape, len(channels))[-1]
    layers: list[nn.Module] = []
    previous = image_shape[0]
    for width_out in channels:
        layers += [nn.Conv2d(previous, width_out, 4, stride=2, padding=1), nn.ReLU()]
        previous = width_out
    return nn.Sequential(
        *layers, nn.Flatten(), nn.Linear(previous * height * width, dense), nn.ReLU(), nn.Linear(dense, out_dim)
    )


def conv_decoder(hidden_dims: list[int], latent_dim: int, image_shape: ImageShape, out_channels: int) -> nn.Sequential:
    """The encoder mirrored: dense layers to the smallest feature map, then stride-2 transposed convolutions;
    output_padding restores odd sizes (7 -> 3 -> 7)."""
    *channels, dense = hidden_dims
    sizes = feature_sizes(image_shape, len(channels))
    height, width = sizes[-1]
    layers: list[nn.Module] = [
        nn.Linear(latent_dim, dense), nn.ReLU(),
        nn.Linear(dense, channels[-1] * height * width), nn.ReLU(), nn.Unflatten(1, (channels[-1], height, width)),
    ]  # fmt: skip
    widths = [*reversed(channels), out_channels]
    for stage, (into, target) in enumerate(zip(reversed(sizes[1:]), reversed(sizes[:-1]))):
        padding = (target[0] - 2 * into[0], target[1] - 2 * into[1])
        layers.append(nn.ConvTranspose2d(widths[stage], widths[stage + 1], 4, stride=2, padding=1, output_padding=padding))
        if stage < len(channels) - 1:
            layers.append(nn.ReLU())
    return nn.Sequential(*layers)


ARCHITECTURES = {"mlp": (mlp_encoder, mlp_decoder), "conv": (conv_encoder, conv_decoder)}


def networks(
    architecture: str, hidden_dims: list[int], encoder_outputs: int, latent_dim: int, image_shape: ImageShape,
    out_channels: int,
) -> tuple[nn.Module, nn.Module]:  # fmt: skip
    """The encoder and the decoder of an architecture for images of image_shape; the decoder gives out_channels
    maps per image (the likelihood's parameters)."""
    make_encoder, make_decoder = ARCHITECTURES[architecture]
    hidden = list(hidden_dims)
    return make_encoder(hidden, encoder_outputs, image_shape), make_decoder(hidden, latent_dim, image_shape, out_channels)

"""aevae: experiment-tracked AE/VAE training for studying latent spaces."""

__version__ = "0.1.0"

"""aevae: experiment-tracked AE/VAE training for studying latent spaces."""

__version__ = "0.1.0"

import os as _os

# Read before anything imports lightning, which sets it (see aevae.steps.plain_cuda_checks).
USER_NVML_CUDA_CHECK = _os.environ.get("PYTORCH_NVML_BASED_CUDA_CHECK")

"""Where sweep workers run: each worker process pinned to one GPU (round-robin), its CPU threads capped."""

from __future__ import annotations

import os
import re
from typing import Sequence

from aevae.errors import UsageError

FAKE_GPUS_ENV = "AEVAE_FAKE_GPU_COUNT"  # tests: place workers as if this many GPUs were visible (training stays on CPU)
WORKER_GPU_ENV = "AEVAE_WORKER_GPU"  # set in a pinned worker: the physical GPU it was given


def visible_gpus() -> list[str]:
    """Physical ids of the GPUs this process may use, in CUDA's order (CUDA_VISIBLE_DEVICES respected)."""
    fake = os.environ.get(FAKE_GPUS_ENV)
    if fake is not None:
        count = int(fake)
    else:
        import torch

        count = torch.cuda.device_count()
    listed = [part.strip() for part in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if part.strip()]
    if "CUDA_VISIBLE_DEVICES" in os.environ and len(listed) >= count:
        return listed[:count]
    return [str(index) for index in range(count)]


def parse_gpus(text: str | None, visible: Sequence[str]) -> list[str]:
    """--gpus 0,2 (indices among the visible GPUs) -> their physical ids; None -> every visible GPU."""
    if text is None:
        return list(visible)
    if not re.fullmatch(r"\s*\d+\s*(,\s*\d+\s*)*", text):
        raise UsageError(f"--gpus: expected GPU indices separated by commas (e.g. 0,2), got {text!r}")
    indices = [int(part) for part in text.split(",")]
    if len(set(indices)) < len(indices):
        raise UsageError(f"--gpus: GPU {next(i for i in indices if indices.count(i) > 1)} is listed twice")
    missing = [index for index in indices if index >= len(visible)]
    if missing:
        shown = f"{len(visible)} (indices 0..{len(visible) - 1})" if visible else "no GPU"
        raise UsageError(f"--gpus: no GPU {missing[0]}; this machine shows {shown}")
    return [visible[index] for index in indices]


def place(workers: int, gpus: Sequence[str]) -> list[str | None]:
    """The GPU of each worker, round-robin (more workers than GPUs share them); no GPUs -> None for all (CPU)."""
    if not gpus:
        return [None] * workers
    return [gpus[index % len(gpus)] for index in range(workers)]


def threads_per_worker(workers: int, cpu_count: int | None = None) -> int:
    """The CPU cores shared out evenly, at least one thread each."""
    return max(1, (cpu_count or os.cpu_count() or 1) // workers)


def pin(gpu: str | None) -> None:
    """In a fresh worker process, before CUDA starts: see only the given GPU (as cuda:0)."""
    if gpu is not None:
        os.environ["CUDA_VISIBLE_DEVICES"] = gpu
        os.environ[WORKER_GPU_ENV] = gpu


def device_name(device: object) -> str:
    """What a trial ran on: "cpu", or "cuda:0 (physical GPU 2)" in a worker pinned to GPU 2."""
    name = str(device)
    gpu = os.environ.get(WORKER_GPU_ENV)
    return f"{name} (physical GPU {gpu})" if name.startswith("cuda") and gpu is not None else name

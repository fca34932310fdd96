"""How one optimizer step runs under manual optimization: eager, through `torch.compile`, or captured once in a
CUDA graph and replayed. Each takes a batch and the raw optimizer; the model's forward_backward does the rest."""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

CAPTURE_WARMUP_STEPS = 3  # eager steps on a side stream before capture, as PyTorch's CUDA-graph recipe asks


class EagerStep:
    """forward + loss + backward, then the optimizer's fused step, under manual optimization: the eager step without
    Lightning's automatic-optimization closure and its bookkeeping, used where nothing needs them."""

    def __init__(self, forward_backward: Callable[[Tensor], Tensor]) -> None:
        self.forward_backward = forward_backward

    def __call__(self, x: Tensor, optimizer: torch.optim.Optimizer) -> Tensor:
        optimizer.zero_grad(set_to_none=True)
        loss = self.forward_backward(x)
        optimizer.step()
        return loss


class CompiledStep(EagerStep):
    """The eager step with forward + loss + backward through `torch.compile` (CPU and GPU). Under mode
    ``reduce-overhead`` (CUDA) inductor also records its kernels in CUDA graphs (its cudagraph trees).

    Random draws use the eager kernels (inductor's fallback_random), so a seeded compiled run follows the same
    noise as an eager one and their losses agree to rounding.
    """

    def __init__(self, forward_backward: Callable[[Tensor], Tensor], mode: str = "default") -> None:
        import torch._inductor.config as inductor_config

        inductor_config.fallback_random = True
        self.mode = mode
        super().__init__(torch.compile(forward_backward, dynamic=False, mode=mode))

    def __call__(self, x: Tensor, optimizer: torch.optim.Optimizer) -> Tensor | None:
        if self.mode != "reduce-overhead":
            return super().__call__(x, optimizer)
        torch.compiler.cudagraph_mark_step_begin()  # a new iteration: the last step's graph outputs may be overwritten
        super().__call__(x, optimizer)
        return None  # a graph's output is overwritten at the next step


class CudaGraphStep:
    """The whole step (forward, loss, backward, fused capturable Adam, the step record) captured once in a CUDA
    graph and replayed: one launch a step, no host work beyond copying the batch into the graph's input.

    The first steps run eagerly on a side stream (warm-up); a batch of another shape (the last, short one of an
    epoch) runs eagerly too, on the same weights and optimizer state.
    """

    def __init__(self, forward_backward: Callable[[Tensor], Tensor]) -> None:
        self.forward_backward = forward_backward
        self.graph: torch.cuda.CUDAGraph | None = None
        self.static_x: Tensor | None = None
        self.warmup_left = CAPTURE_WARMUP_STEPS

    def __call__(self, x: Tensor, optimizer: torch.optim.Optimizer) -> None:
        if self.graph is not None and x.shape == self.static_x.shape:
            self.static_x.copy_(x)
            self.graph.replay()
        elif self.warmup_left > 0:
            self.warmup_left -= 1
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                self.eager(x, optimizer)
            torch.cuda.current_stream().wait_stream(side)
        elif self.graph is None:
            self.capture(x, optimizer)
            self.static_x.copy_(x)
            self.graph.replay()  # capture records without running: this step's work runs now
        else:
            self.eager(x, optimizer)

    def eager(self, x: Tensor, optimizer: torch.optim.Optimizer) -> None:
        for group in optimizer.param_groups:  # after capture the gradients are the graph's: zero them in place
            for p in group["params"]:
                if p.grad is not None:
                    p.grad.zero_()
        self.forward_backward(x)
        optimizer.step()

    def capture(self, x: Tensor, optimizer: torch.optim.Optimizer) -> None:
        self.static_x = x.clone()
        optimizer.zero_grad(set_to_none=True)  # backward inside the capture then allocates them from its pool
        self.graph = torch.cuda.CUDAGraph()
        autocast = torch.is_autocast_enabled("cuda")
        dtype = torch.get_autocast_dtype("cuda")
        with torch.cuda.graph(self.graph):
            # Autocast's weight cache must be off under capture (PyTorch's CUDA-graph notes).
            with torch.autocast("cuda", dtype=dtype, enabled=autocast, cache_enabled=False):
                self.forward_backward(self.static_x)
            optimizer.step()

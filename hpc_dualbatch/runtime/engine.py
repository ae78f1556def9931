"""Device choice, optimiser, one training step and evaluation: single-process pieces
shared by the workers, the synchronous baseline, `profile` and the benchmarks.

Nothing here talks to another rank; callers reduce the returned sums.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.nn as nn
import torch.nn.functional as F

from hpc_dualbatch.config import OptimConfig


def pick_device(choice: str, local_rank: int = 0) -> torch.device:
    """auto: one GPU per local rank when CUDA is present, else the CPU."""
    if choice == "cpu" or (choice == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        from hpc_dualbatch.errors import ConfigError

        raise ConfigError("config key 'device' is 'cuda' but no CUDA device is visible; use auto or cpu")
    dev = torch.device("cuda", local_rank % torch.cuda.device_count())
    torch.cuda.set_device(dev)
    return dev


def make_optimizer(
    model: nn.Module, cfg: OptimConfig, lr: float, momentum: float | None = None
) -> torch.optim.SGD:
    """SGD at `momentum` (default cfg.momentum: a run passes `Config.momentum`'s, by mode)."""
    # Same LR for both batch sizes (method section 1: no linear scaling).
    mu = cfg.momentum if momentum is None else momentum
    return torch.optim.SGD(model.parameters(), lr=lr, momentum=mu, weight_decay=cfg.weight_decay)


def set_lr(opt: torch.optim.Optimizer, lr: float) -> None:
    for g in opt.param_groups:
        g["lr"] = lr


def train_step(
    model: nn.Module, opt: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor
) -> tuple[float, int]:
    """One SGD step; returns (summed loss over the batch, number correct)."""
    opt.zero_grad()  # (Horovod's wrapper takes no set_to_none; torch 2 defaults to it)
    logits = model(x)
    loss = F.cross_entropy(logits, y)
    loss.backward()
    opt.step()
    with torch.no_grad():
        correct = int((logits.argmax(1) == y).sum())
    return loss.item() * len(y), correct


@torch.no_grad()
def evaluate(
    model: nn.Module, batches: Iterable[tuple[torch.Tensor, torch.Tensor]]
) -> tuple[float, int, int]:
    """Returns (summed loss, correct, samples) over `batches`; the model is left in eval mode."""
    model.eval()
    loss_sum, correct, n = 0.0, 0, 0
    for x, y in batches:
        logits = model(x)
        loss_sum += float(F.cross_entropy(logits, y, reduction="sum"))
        correct += int((logits.argmax(1) == y).sum())
        n += len(y)
    return loss_sum, correct, n


@torch.no_grad()
def recalibrate_bn(model: nn.Module, batches: Iterable[tuple[torch.Tensor, torch.Tensor]]) -> int:
    """Recompute every batch-norm layer's running statistics from `batches`.

    The statistics are reset, then averaged with equal weight per batch (BN momentum None
    is PyTorch's cumulative average), in train mode without gradients, as stochastic weight
    averaging does after averaging weights: running statistics merged from models that
    drifted apart do not describe the merged weights. Returns the samples seen; the model is
    left in eval mode with its BN momenta as they were.
    """
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    momenta = [m.momentum for m in bns]
    for m in bns:
        m.reset_running_stats()
        m.momentum = None
    model.train()
    n = 0
    try:
        for x, _ in batches:
            model(x)
            n += len(x)
    finally:
        for m, mom in zip(bns, momenta):
            m.momentum = mom
        model.eval()
    return n

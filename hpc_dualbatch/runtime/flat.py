"""A model's weights and momentum as flat float32 buffers: what travels to the server.

The flat weight vector is every parameter followed by every floating-point
buffer (batch-norm running mean and variance), in `state_dict` order; integer
buffers (`num_batches_tracked`) stay local, they only matter when BN momentum
is None. The momentum vector follows the parameters in the same order.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.nn as nn

from hpc_dualbatch.runtime.model import build_model


def initial_weights(cfg: Any, staged: Any) -> tuple[np.ndarray, int]:
    """A run's initial flat weights and their number of parameters, from its seed (`cfg`: the
    run's Config, `staged`: its StagedData): the same for the parameter server and the
    synchronous baseline, so both start from one model."""
    torch.manual_seed(cfg.seed)
    model = build_model(cfg.model.arch, staged.num_classes, staged.channels, cfg.model.width)
    flat = FlatModel(model)
    return flat.weights(), flat.n_params


class FlatModel:
    def __init__(self, model: nn.Module) -> None:
        self.params = [p for p in model.parameters()]
        self.buffers = [b for b in model.buffers() if b.is_floating_point()]
        self.tensors = self.params + self.buffers
        self.n_params = sum(p.numel() for p in self.params)
        self.n_weights = self.n_params + sum(b.numel() for b in self.buffers)
        self.n_buffers = self.n_weights - self.n_params

    def weights(self, out: np.ndarray | None = None) -> np.ndarray:
        """Copy the weights into `out` (float32[n_weights], allocated if None)."""
        out = np.empty(self.n_weights, np.float32) if out is None else out
        self._gather(self.tensors, out)
        return out

    @torch.no_grad()
    def load_weights(self, flat: np.ndarray) -> None:
        self._scatter(self.tensors, flat)

    def buffers_flat(self, out: np.ndarray | None = None) -> np.ndarray:
        """The floating-point buffers alone (float32[n_buffers]): the tail of `weights`."""
        out = np.empty(self.n_buffers, np.float32) if out is None else out
        self._gather(self.buffers, out)
        return out

    @torch.no_grad()
    def load_buffers(self, flat: np.ndarray) -> None:
        self._scatter(self.buffers, flat)

    def momentum(self, opt: torch.optim.Optimizer, out: np.ndarray | None = None) -> np.ndarray:
        """SGD momentum buffers as float32[n_params]; zeros before the first step, which
        SGD (dampening 0) treats the same as no buffer: buf = 0.9 * 0 + grad."""
        out = np.empty(self.n_params, np.float32) if out is None else out
        bufs = [opt.state.get(p, {}).get("momentum_buffer") for p in self.params]
        self._gather([b if b is not None else torch.zeros_like(p) for b, p in zip(bufs, self.params)], out)
        return out

    @torch.no_grad()
    def load_momentum(self, opt: torch.optim.Optimizer, flat: np.ndarray) -> None:
        for p in self.params:
            opt.state[p]["momentum_buffer"] = torch.zeros_like(p)
        self._scatter([opt.state[p]["momentum_buffer"] for p in self.params], flat)

    @staticmethod
    def _gather(tensors: list[torch.Tensor], out: np.ndarray) -> None:
        i = 0
        for t in tensors:
            n = t.numel()
            out[i : i + n] = t.detach().reshape(-1).float().cpu().numpy()
            i += n

    @staticmethod
    @torch.no_grad()
    def _scatter(tensors: list[torch.Tensor], flat: np.ndarray) -> None:
        src = torch.from_numpy(flat)
        i = 0
        for t in tensors:
            n = t.numel()
            t.copy_(src[i : i + n].view_as(t))
            i += n

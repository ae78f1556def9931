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


def push_body(w: torch.Tensor, pulled: np.ndarray | None, out: np.ndarray, n_params: int) -> float:
    """`out` <- what a push carries, from the weights `w` (float32[n_weights], CPU; may be `out`
    itself): the parameters' update since the pull `w - pulled` (server.merge delta, nova) or,
    with `pulled` None, the parameters themselves (paper), then the BN buffers as they are.
    Returns the L2 norm of the parameter part: the push's size, which the server logs and checks
    for finiteness before it merges (NaN or inf in any parameter makes it non-finite), so no
    server shard reads the body twice. One pass more on the leader, one fewer on the server,
    which serves every group: 2.3 ms at ResNet-18 size on one core here; written chunk by chunk
    (1 MiB) to read the norm from cache it took longer (per-chunk overhead, evictions)."""
    o, same = torch.from_numpy(out), w.data_ptr() == out.ctypes.data
    if pulled is not None:
        torch.sub(w[:n_params], torch.from_numpy(pulled), out=o[:n_params])
    elif not same:
        o[:n_params].copy_(w[:n_params])
    if not same:
        o[n_params:].copy_(w[n_params:])
    return float(torch.linalg.vector_norm(o[:n_params]))


class FlatModel:
    """The model's weights as one flat float32 tensor (`self.flat`, on the model's device).

    At construction every parameter and floating-point buffer becomes a view of its slice of
    `self.flat` (the parameters keep their identity, so an optimizer made before or after sees
    them): copying the weights out for a push and in from its reply is one copy each way: 0.03
    ms for ResNet-18 at width 8 (102 tensors) where a copy per tensor took 0.40 ms, 0.86x of it
    at width 64 (`results/bench/flatcopy.py`). Keep the model where it is afterwards:
    `model.to(...)` would replace the views.
    """

    def __init__(self, model: nn.Module) -> None:
        self.params = [p for p in model.parameters()]
        named = [(n, b) for n, b in model.named_buffers() if b.is_floating_point()]
        tensors = self.params + [b for _, b in named]
        bad = [t.dtype for t in tensors if t.dtype != torch.float32]
        if bad:
            raise ValueError(f"FlatModel needs float32 parameters and buffers, found {bad[0]}")
        self.n_params = sum(p.numel() for p in self.params)
        self.n_weights = sum(t.numel() for t in tensors)
        self.n_buffers = self.n_weights - self.n_params
        device = tensors[0].device if tensors else torch.device("cpu")
        self.flat = torch.empty(self.n_weights, dtype=torch.float32, device=device)
        views, i = [], 0
        for t in tensors:
            views.append(self.flat[i : i + t.numel()].view_as(t))
            i += t.numel()
        with torch.no_grad():
            for p, v in zip(self.params, views):
                v.copy_(p)
                p.data = v
            for (name, b), v in zip(named, views[len(self.params) :]):
                v.copy_(b)
                owner, _, leaf = name.rpartition(".")
                model.get_submodule(owner)._buffers[leaf] = v

    def weights(self, out: np.ndarray | None = None) -> np.ndarray:
        """Copy the weights into `out` (float32[n_weights], allocated if None)."""
        out = np.empty(self.n_weights, np.float32) if out is None else out
        torch.from_numpy(out).copy_(self.flat)
        return out

    def push_body(self, pulled: np.ndarray | None, out: np.ndarray) -> float:
        """`out` <- what a push carries (`push_body`) from the model's weights; returns the norm
        of its parameter part. On a GPU one copy to the host first, the arithmetic there."""
        if self.flat.device.type == "cpu":
            return push_body(self.flat, pulled, out, self.n_params)
        self.weights(out)
        return push_body(torch.from_numpy(out), pulled, out, self.n_params)

    @torch.no_grad()
    def load_weights(self, flat: np.ndarray) -> None:
        self.flat.copy_(torch.from_numpy(flat))

    def buffers_flat(self, out: np.ndarray | None = None) -> np.ndarray:
        """The floating-point buffers alone (float32[n_buffers]): the tail of `weights`."""
        out = np.empty(self.n_buffers, np.float32) if out is None else out
        torch.from_numpy(out).copy_(self.flat[self.n_params :])
        return out

    @torch.no_grad()
    def load_buffers(self, flat: np.ndarray) -> None:
        self.flat[self.n_params :].copy_(torch.from_numpy(flat))

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

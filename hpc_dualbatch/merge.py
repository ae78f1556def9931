"""How the server folds one push into the global weights: pure functions, no MPI.

Two rules for the parameters (`server.merge`):

* `paper`, the method's rule: ``w <- (w + f*w_i) / (1 + f)``. With n groups, each
  pushing weights trained from a pull up to n-1 commits old, the global model keeps
  about 1/(n+1) of each push's own progress (method section 4).
* `delta`: ``w <- w + a * (w_i - w_pulled)``, the group's own update since its pull,
  scaled by ``a = f / sum(f) * min(1, n / (staleness + 1))``. With n equal groups each
  push moves the global model by 1/n of its update, so one round of n pushes applies
  the mean update, as synchronous local SGD does when it averages (Lin et al. 2020,
  "Don't use large mini-batches, use local SGD"); f keeps a small group's push weight
  relative to a large one's as in the method. A push staler than one round (staleness
  > n-1 merges, a straggler) is scaled down by n/(staleness+1), after FedAsync's
  staleness-dependent weight (Xie et al. 2019).

Batch-norm running statistics never take a delta (a variance moved by a difference of
variances can turn negative): they are averaged with the paper's rule, or kept per
group (`server.bn: local`).
"""

from __future__ import annotations

import numpy as np
import torch


def merge_paper(w: np.ndarray, wi: np.ndarray, f: float) -> None:
    """w <- (w + f*wi) / (1 + f), in place.

    Written as w + t*(wi - w) with t = f/(1+f): torch's lerp_ does that in one multi-threaded
    pass over both buffers, where the literal formula costs three numpy passes (the merge is
    the server's largest cost per push, see docs/scaling.md).
    """
    torch.from_numpy(w).lerp_(torch.from_numpy(wi), f / (1.0 + f))


def delta_weight(f: float, f_sum: float, n_groups: int, staleness: int) -> float:
    """Scale `a` of a push's update under the `delta` rule (see the module docstring)."""
    if f_sum <= 0 or n_groups < 1 or staleness < 0:
        raise ValueError(
            f"need f_sum > 0, n_groups >= 1, staleness >= 0; got {f_sum}, {n_groups}, {staleness}"
        )
    return f / f_sum * min(1.0, n_groups / (staleness + 1))


def merge_delta(w: np.ndarray, wi: np.ndarray, pulled: np.ndarray, a: float) -> None:
    """w <- w + a * (wi - pulled), in place; `wi` is overwritten with the update wi - pulled."""
    d = torch.from_numpy(wi).sub_(torch.from_numpy(pulled))
    torch.from_numpy(w).add_(d, alpha=a)


def distance(a: np.ndarray, b: np.ndarray) -> float:
    """Euclidean distance ||a - b||, one pass, no copies (torch reduces float32 pairwise)."""
    return float(torch.dist(torch.from_numpy(a), torch.from_numpy(b)))

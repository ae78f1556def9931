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


class MergeRule:
    """One rule of `server.merge` with the state it needs, and the rule of `server.bn`: the
    server tells it when a group pulls (`pulled`) and hands it each push (`fold`,
    `fold_buffers`); it knows nothing else of the server. A new rule is one subclass."""

    def __init__(self, factors: list[float], bn: str, group_buffers: np.ndarray, merges: int) -> None:
        self.factors, self.f_sum, self.n, self.bn = factors, sum(factors), len(factors), bn
        self.group_buffers = group_buffers  # (n_groups, n_buffers), each group's own (bn: local)
        self.pulled_at = [merges] * self.n  # the merge count at each group's last pull

    def pulled(self, g: int, params: np.ndarray, merges: int) -> None:
        """Group g pulled `params` (a reply that lets it train) after `merges` merges."""
        self.pulled_at[g] = merges

    def staleness(self, g: int, merges: int) -> int:
        """Merges by other pushes since group g's pull."""
        return merges - self.pulled_at[g]

    def fold(self, g: int, w: np.ndarray, wi: np.ndarray, staleness: int) -> float:
        """Fold group g's pushed parameters `wi` into `w` in place; returns the push's weight."""
        raise NotImplementedError

    def fold_buffers(self, g: int, buffers: np.ndarray, pushed: np.ndarray) -> None:
        """BN running statistics: the group's own kept (local), else averaged by the paper's rule."""
        if self.bn == "local":
            self.group_buffers[g] = pushed
        else:
            merge_paper(buffers, pushed, self.factors[g])

    def buffers_for(self, g: int, buffers: np.ndarray) -> np.ndarray:
        """The BN buffers a reply to group g carries."""
        return self.group_buffers[g] if self.bn == "local" else buffers


class PaperRule(MergeRule):
    def fold(self, g: int, w: np.ndarray, wi: np.ndarray, staleness: int) -> float:
        merge_paper(w, wi, self.factors[g])
        return self.factors[g] / (1.0 + self.factors[g])


class DeltaRule(MergeRule):
    """Keeps the parameters each group last pulled (n_groups x n_params floats)."""

    def __init__(
        self, factors: list[float], bn: str, group_buffers: np.ndarray, merges: int, params: np.ndarray
    ):
        super().__init__(factors, bn, group_buffers, merges)
        self.copies = np.repeat(params[None], self.n, 0)

    def pulled(self, g: int, params: np.ndarray, merges: int) -> None:
        super().pulled(g, params, merges)
        self.copies[g] = params

    def fold(self, g: int, w: np.ndarray, wi: np.ndarray, staleness: int) -> float:
        a = delta_weight(self.factors[g], self.f_sum, self.n, staleness)
        merge_delta(w, wi, self.copies[g], a)
        return a


def make_rule(
    merge: str, bn: str, factors: list[float], params: np.ndarray, group_buffers: np.ndarray, merges: int
) -> MergeRule:
    """The rule of `server.merge` (paper | delta) starting from global parameters `params`."""
    if merge == "delta":
        return DeltaRule(factors, bn, group_buffers, merges, params)
    return PaperRule(factors, bn, group_buffers, merges)

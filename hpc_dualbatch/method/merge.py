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

* `nova`: the `delta` rule with each update normalised by its local progress, after FedNova
  (Wang et al. 2020, arXiv 2007.07481): a push of tau steps at batch B over m = tau*B samples
  is weighted by its samples and divided by its steps, ``a = B / sum(B) * min(1, n /
  (staleness + 1))`` (sum over the groups' batches at the push's resolution). Equal groups get
  1/n, as under `delta`; in a dual-batch run a small group's update, which took d_L/B_L :
  d_S/B_S more steps per sample than a large group's, no longer weighs that much more per
  sample: over a mini-epoch the global model moves as one synchronous step over all groups'
  samples at batch sum(B) would. (Every group shares the SGD momentum, so FedNova's momentum
  correction cancels.)

Outer momentum (`server.outer`, `Outer`): the steps above are a pseudo-gradient to which the
server applies Nesterov momentum, as DiLoCo does per round (Douillard et al. 2023, arXiv
2311.08105: outer lr 0.7, momentum 0.9). `nesterov` takes the momentum step at every push;
`delayed` (Liu et al. 2024, arXiv 2401.09135, "delayed Nesterov") applies plain steps as the
pushes arrive and the momentum step once every n pushes. The buffer is kept in units of the
inner learning rate and applied at the current one (SlowMo, Wang et al. 2020, arXiv
1910.00643), so a rate decay does not carry the steps of the rate before it. Momentum 0 and
outer lr 1 are the plain rule.

Under `delta` and `nova` a push carries the group's update ``w_i - w_pulled``, computed by its
leader from the parameters it pulled (as BytePS's asynchronous mode does): the server keeps no
copy of what each group pulled, so its state is O(n_params) whatever the number of groups, and
the merge is one pass. The leader also measures its push (the norm in the request header), so
the server's finiteness check and logged distance read no weights. Under `paper` a push carries
the weights ``w_i`` (`pushes_update`).

Batch-norm running statistics never take a delta (a variance moved by a difference of
variances can turn negative): they are averaged with the paper's rule, or kept per
group (`server.bn: local`).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch


def merge_paper(w: np.ndarray, wi: np.ndarray, f: float) -> None:
    """w <- (w + f*wi) / (1 + f), in place.

    Written as w + t*(wi - w) with t = f/(1+f): torch's lerp_ does that in one multi-threaded
    pass over both buffers, where the literal formula costs three numpy passes (the merge is
    the server's largest cost per push, see docs/scaling.md).
    """
    lerp(w, wi, f / (1.0 + f))


def lerp(w: np.ndarray, wi: np.ndarray, t: float) -> None:
    """w <- w + t*(wi - w), in place, one pass."""
    torch.from_numpy(w).lerp_(torch.from_numpy(wi), t)


def delta_weight(f: float, f_sum: float, n_groups: int, staleness: int) -> float:
    """Scale `a` of a push's update under the `delta` rule (see the module docstring)."""
    if f_sum <= 0 or n_groups < 1 or staleness < 0:
        raise ValueError(
            f"need f_sum > 0, n_groups >= 1, staleness >= 0; got {f_sum}, {n_groups}, {staleness}"
        )
    return f / f_sum * min(1.0, n_groups / (staleness + 1))


def nova_weight(batch: int, batches: list[int], staleness: int) -> float:
    """Scale `a` of a push's update under the `nova` rule (see the module docstring)."""
    if batch <= 0 or min(batches) <= 0 or staleness < 0:
        raise ValueError(f"need batches > 0 and staleness >= 0; got {batch}, {batches}, {staleness}")
    return batch / sum(batches) * min(1.0, len(batches) / (staleness + 1))


def pushes_update(merge: str) -> bool:
    """Whether a push under `server.merge` carries the group's update w_i - w_pulled (delta,
    nova) rather than its weights w_i (paper): decided here for both ends of the exchange."""
    return merge != "paper"


def merge_delta(w: np.ndarray, u: np.ndarray, a: float) -> None:
    """w <- w + a * u, in place (u: a group's update w_i - w_pulled)."""
    torch.from_numpy(w).add_(torch.from_numpy(u), alpha=a)


class Outer:
    """Nesterov momentum over the rule's steps u = a * (w_i - w_pulled) (`server.outer`).

    Per push: w += lr_out * u, and the round's sum collects u / lr (lr: the inner rate the push
    trained at). Every `every` pushes (1: `nesterov`; n groups: `delayed`): m <- mu*m + sum,
    w += lr_out * mu * lr * m, sum <- 0. Over one round that is Nesterov's
    w += lr_out * (U + mu*m) with m <- mu*m + U on the round's summed step U (at a constant lr).
    `state`: (2, n_params) float32, the buffer m and the round's sum, and the pushes counted so
    far: what a checkpoint holds for an exact resume.
    """

    def __init__(self, lr: float, momentum: float, every: int, state: np.ndarray, count: int = 0) -> None:
        if every < 1 or state.ndim != 2 or state.shape[0] != 2:
            raise ValueError(f"need every >= 1 and a (2, n_params) state; got {every}, {state.shape}")
        self.lr, self.mu, self.every, self.state, self.count = lr, momentum, every, state, count

    def step(self, w: np.ndarray, u: np.ndarray, a: float, lr: float) -> None:
        """Apply the step a*u (u: the push's update) to `w` in place; lr: its inner rate > 0."""
        tw, tu = torch.from_numpy(w), torch.from_numpy(u)
        tw.add_(tu, alpha=self.lr * a)
        if self.mu == 0:
            return
        m, acc = torch.from_numpy(self.state[0]), torch.from_numpy(self.state[1])
        acc.add_(tu, alpha=a / lr)
        self.count += 1
        if self.count % self.every == 0:
            m.mul_(self.mu).add_(acc)
            tw.add_(m, alpha=self.lr * self.mu * lr)
            acc.zero_()


def distance(a: np.ndarray, b: np.ndarray) -> float:
    """Euclidean distance ||a - b||, one pass, no copies (torch reduces float32 pairwise)."""
    return float(torch.dist(torch.from_numpy(a), torch.from_numpy(b)))


@dataclass
class PushInfo:
    """What a rule may need to know of one push besides the weights."""

    group: int
    staleness: int  # merges by other pushes since the group's pull
    lr: float  # the inner learning rate its task trained at (outer momentum's unit)
    batches: list[int]  # every group's batch at the push's resolution (nova)
    lr_scale: float = 1.0  # server.stale_lr: rescale: the newest stage's rate over its own (<= 1)


class MergeRule:
    """One rule of `server.merge` with the state it needs, and the rule of `server.bn`: the
    server tells it when a group pulls (`pulled`) and hands it each push (`fold`,
    `fold_buffers`); it knows nothing else of the server. A new rule is one subclass."""

    def __init__(self, factors: list[float], bn: str, group_buffers: np.ndarray, merges: int) -> None:
        self.factors, self.f_sum, self.n, self.bn = factors, sum(factors), len(factors), bn
        self.group_buffers = group_buffers  # (n_groups, n_buffers), each group's own (bn: local)
        self.pulled_at = [merges] * self.n  # the merge count at each group's last pull

    def pulled(self, g: int, merges: int) -> None:
        """Group g pulled the global parameters (a reply that lets it train) after `merges` merges."""
        self.pulled_at[g] = merges

    def distance(self, w: np.ndarray, pushed: np.ndarray, norm: float) -> float:
        """The size of a push (`norm`: ||pushed||, its leader's): ||w_i - w|| of the pushed
        weights from the global ones (with server shards, of this shard's slice)."""
        return distance(pushed, w)

    def staleness(self, g: int, merges: int) -> int:
        """Merges by other pushes since group g's pull."""
        return merges - self.pulled_at[g]

    def weight(self, push: PushInfo) -> float:
        """The push's weight a: how much of it the global weights take."""
        raise NotImplementedError

    def apply(self, w: np.ndarray, pushed: np.ndarray, a: float, lr: float) -> None:
        """Fold the pushed parameters (`pushes_update`: the update, else the weights) into `w` in
        place with weight `a` (a server shard applies its slice with the weight shard 0 chose)."""
        raise NotImplementedError

    def fold(self, push: PushInfo, w: np.ndarray, pushed: np.ndarray) -> float:
        """Fold a push into `w` in place; returns its weight (the rule's, times the push's
        `lr_scale`)."""
        a = self.weight(push) * push.lr_scale
        self.apply(w, pushed, a, push.lr)
        return a

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
    def weight(self, push: PushInfo) -> float:
        f = self.factors[push.group]
        return f / (1.0 + f)

    def apply(self, w: np.ndarray, pushed: np.ndarray, a: float, lr: float) -> None:
        lerp(w, pushed, a)  # = merge_paper with a = f/(1+f)


class DeltaRule(MergeRule):
    """Applies the weighted update a push carries, directly or through outer momentum (`outer`)."""

    def __init__(
        self,
        factors: list[float],
        bn: str,
        group_buffers: np.ndarray,
        merges: int,
        outer: Outer | None = None,
    ):
        super().__init__(factors, bn, group_buffers, merges)
        self.outer = outer

    def distance(self, w: np.ndarray, pushed: np.ndarray, norm: float) -> float:
        """||w_i - w_pulled||: the update's own size, as its leader measured it (no pass here)."""
        return norm

    def weight(self, push: PushInfo) -> float:
        return delta_weight(self.factors[push.group], self.f_sum, self.n, push.staleness)

    def apply(self, w: np.ndarray, pushed: np.ndarray, a: float, lr: float) -> None:
        if self.outer is None:
            merge_delta(w, pushed, a)
        else:
            self.outer.step(w, pushed, a, lr)


class NovaRule(DeltaRule):
    def weight(self, push: PushInfo) -> float:
        return nova_weight(push.batches[push.group], push.batches, push.staleness)


def make_rule(
    merge: str,
    bn: str,
    factors: list[float],
    group_buffers: np.ndarray,
    merges: int,
    outer: Outer | None = None,
) -> MergeRule:
    """The rule of `server.merge` (paper | delta | nova); `outer` (delta and nova only): the
    server's outer momentum."""
    if merge == "paper":
        if outer is not None:
            raise ValueError("outer momentum needs an update to act on: server.merge delta or nova")
        return PaperRule(factors, bn, group_buffers, merges)
    rule = NovaRule if merge == "nova" else DeltaRule
    return rule(factors, bn, group_buffers, merges, outer)

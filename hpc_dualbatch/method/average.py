"""Tail averaging (`schedule.average: last_stage`): the model evaluated and saved is the uniform
mean of the parameters over the last learning-rate stage, not the last iterate.

At a constant small rate SGD's iterates wander around a minimum with a spread set by the
rate and the gradient noise; their mean sits nearer its centre than any one of them (Polyak and
Juditsky 1992; stochastic weight averaging, Izmailov et al. 2018, arXiv 1803.05407, which
averages the tail of a schedule and recomputes the BN statistics of the mean). Asynchronous
merges add noise of their own to the server's iterates, which the mean also damps. It is
sampled after every step of a synchronous run and after every merge of the server (the same
rate on the Fashion-MNIST grid: one step at 4 x B per 4 groups' pushes of 4 steps at B), from
the first one trained at the last stage's rate. Training never reads it.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch


class TailAverage:
    """The running mean of the parameters added so far (`count` of them), a float32 numpy array
    (the server's) or torch tensor (a synchronous run's, on the model's device); a resume
    restores `mean` and `count` from the checkpoint and continues exactly."""

    def __init__(self, n_params: int, mean: Any = None, count: int = 0) -> None:
        self.mean = np.zeros(n_params, np.float32) if mean is None else mean
        self.count = count

    def add(self, params: Any) -> None:
        """mean <- mean + (params - mean) / count: one pass in place, no temporaries (torch's lerp,
        as `merge.lerp`; float32, as the weights; the first add copies `params` exactly)."""
        self.count += 1
        torch.as_tensor(self.mean).lerp_(torch.as_tensor(params), 1.0 / self.count)

    def params(self, current: Any) -> Any:
        """What an evaluation reads: the mean once anything was added, else `current`."""
        return self.mean if self.count else current

"""FlatModel: the model's parameters and BN buffers as views of one flat float32 tensor."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn as nn

from hpc_dualbatch.runtime.engine import recalibrate_bn
from hpc_dualbatch.runtime.flat import FlatModel, push_body
from hpc_dualbatch.runtime.model import build_model


def concat(model: nn.Module) -> np.ndarray:
    """Every parameter, then every floating-point buffer, read from the model itself."""
    ts = [p for p in model.parameters()] + [b for b in model.buffers() if b.is_floating_point()]
    return torch.cat([t.detach().reshape(-1) for t in ts]).numpy()


def model_and_flat(seed: int = 0) -> tuple[nn.Module, FlatModel]:
    torch.manual_seed(seed)
    return (m := build_model("resnet18_cifar", 10, 1, 8)), FlatModel(m)


def test_the_flat_weights_are_the_models_own_in_order_and_the_model_computes_as_before():
    torch.manual_seed(0)
    model = build_model("resnet18_cifar", 10, 1, 8).eval()
    x = torch.randn(4, 1, 12, 12)
    before, y0 = concat(model), model(x)
    params = list(model.parameters())
    flat = FlatModel(model)
    assert flat.n_weights == before.size and flat.n_params == sum(p.numel() for p in params)
    assert np.array_equal(flat.weights(), before) and np.array_equal(concat(model), before)
    assert all(a is b for a, b in zip(model.parameters(), params))  # an optimizer's keys stay valid
    torch.testing.assert_close(model(x), y0, rtol=0, atol=0)


def test_training_steps_and_bn_updates_show_in_the_flat_weights_and_loads_reach_the_model():
    model, flat = model_and_flat()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4)
    w0 = flat.weights()
    model.train()
    for _ in range(2):  # SGD steps and BN running statistics change the model in place
        opt.zero_grad()
        nn.functional.cross_entropy(model(torch.randn(8, 1, 12, 12)), torch.randint(0, 10, (8,))).backward()
        opt.step()
    w1 = flat.weights()
    assert np.array_equal(w1, concat(model))
    assert not np.array_equal(w1[: flat.n_params], w0[: flat.n_params])  # the parameters moved
    assert not np.array_equal(w1[flat.n_params :], w0[flat.n_params :])  # the running statistics too
    recalibrate_bn(model, [(torch.randn(16, 1, 12, 12) * 2 + 1, None)])
    assert np.array_equal(flat.buffers_flat(), concat(model)[flat.n_params :])
    # loads reach every parameter and buffer, and training goes on from them
    w = np.random.default_rng(1).standard_normal(flat.n_weights).astype(np.float32)
    flat.load_weights(w)
    assert np.array_equal(concat(model), w)
    b = np.arange(flat.n_buffers, dtype=np.float32)
    flat.load_buffers(b)
    assert np.array_equal(concat(model)[flat.n_params :], b) and np.array_equal(
        concat(model)[: flat.n_params], w[: flat.n_params]
    )
    opt.zero_grad()
    model(torch.randn(8, 1, 12, 12)).sum().backward()
    opt.step()
    assert np.array_equal(flat.weights(), concat(model))


@pytest.mark.parametrize("rule", ["delta", "paper"])
def test_a_push_carries_the_update_or_the_weights_with_the_buffers_and_its_leader_measures_it(rule):
    """delta, nova: the weights less the pulled parameters, bit for bit numpy's float32
    difference; paper: the parameters. BN buffers as they are; the model untouched; the norm is
    the parameter part's (float64 reference), and NaN or inf in any parameter makes it non-finite."""
    model, flat = model_and_flat()
    n = flat.n_params
    pulled = np.random.default_rng(2).standard_normal(n).astype(np.float32) if rule == "delta" else None
    w, out = flat.weights(), np.full(flat.n_weights, np.nan, np.float32)
    norm = flat.push_body(pulled, out)
    want = w[:n] - pulled if pulled is not None else w[:n]
    assert np.array_equal(out[:n], want) and np.array_equal(out[n:], w[n:])
    assert norm == pytest.approx(float(np.linalg.norm(want.astype(np.float64))), rel=1e-5)
    assert np.array_equal(flat.weights(), w)  # the model untouched
    for bad in (np.nan, np.inf):
        with torch.no_grad():
            flat.flat[n // 2] = bad
        assert not np.isfinite(flat.push_body(pulled, out))
    in_place = w.copy()  # the leader's own buffer as the weights (a GPU model's host copy)
    assert push_body(torch.from_numpy(in_place), pulled, in_place, n) == pytest.approx(norm, rel=1e-6)
    assert np.array_equal(in_place[:n], want) and np.array_equal(in_place[n:], w[n:])


def test_two_models_from_one_seed_give_one_flat_vector_and_momentum_round_trips():
    (m1, f1), (_, f2) = model_and_flat(3), model_and_flat(3)
    assert np.array_equal(f1.weights(), f2.weights())
    opt = torch.optim.SGD(m1.parameters(), lr=0.1, momentum=0.9)
    mom = np.linspace(-1, 1, f1.n_params, dtype=np.float32)
    f1.load_momentum(opt, mom)
    assert np.array_equal(f1.momentum(opt), mom)


def test_a_model_that_is_not_float32_is_refused():
    with pytest.raises(ValueError, match="float32"):
        FlatModel(nn.Linear(2, 2).double())

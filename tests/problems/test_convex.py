"""Lab 03's problems: its Workload, autograd's gradients at a flat vector, clear refusals."""
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parameters_to_vector

from distlab.problems import convex
from distlab.problems.data import linear_regression


def test_the_default_workload_is_linear_regression_on_its_seeded_data():
    w = convex.WORKLOAD.loaded()
    assert (w.model, w.batch_size, w.lr, w.num_steps) == ("linear", 32, 0.05, 200)
    torch.testing.assert_close(w.dataset.X, linear_regression(seed=w.seed).X, rtol=0, atol=0)


def test_the_digits_workload_is_a_one_hidden_layer_mlp_of_width_32():
    model = replace(convex.WORKLOAD, model="mlp").build_model()
    assert [tuple(p.shape) for p in model.parameters()] == [(32, 64), (32,), (10, 32), (10,)]
    assert isinstance(model[1], nn.ReLU)


def test_the_flat_gradient_is_autograd_on_the_given_parameters():
    w = convex.WORKLOAD.loaded()
    model, ds = w.build_model(), w.dataset
    P = sum(p.numel() for p in model.parameters())
    flat = torch.randn(P, generator=torch.Generator().manual_seed(0))
    loss, g = convex.flat_gradient(model, w.loss, ds.X[:64], ds.y[:64], flat)
    wt, b = flat[:-1].reshape(1, -1).clone().requires_grad_(), flat[-1:].clone().requires_grad_()
    expected = F.mse_loss(F.linear(ds.X[:64], wt, b), ds.y[:64])
    expected.backward()
    torch.testing.assert_close(loss, expected.detach())
    torch.testing.assert_close(g, torch.cat([wt.grad.flatten(), b.grad]))


def test_clipping_bounds_the_gradient_norm():
    w = convex.WORKLOAD.loaded()
    model, ds = w.build_model(), w.dataset
    flat = parameters_to_vector(model.parameters()).detach() + 10
    _, g = convex.flat_gradient(model, w.loss, ds.X, ds.y, flat, clip=0.5)
    assert float(g.norm()) == pytest.approx(0.5, rel=1e-4)


def test_each_sparse_example_touches_nnz_features():
    ds, cols = convex.sparse_logistic(num_features=100, nnz=5, seed=1)
    assert cols.shape == (len(ds.y), 5)
    assert torch.equal(ds.X.ne(0).sum(1), torch.full((len(ds.y),), 5))


@pytest.mark.parametrize("call,match", [
    (lambda: convex.sparse_logistic(seed=0.5), "seed=0.5"),
    (lambda: convex.sparse_logistic(num_features=10, nnz=11), "nnz=11"),
    (lambda: convex.sparse_logistic(num_features=True), "num_features=True")])
def test_bad_arguments_are_refused_by_name(call, match):
    with pytest.raises(ValueError, match=match):
        call()


def test_a_non_positive_clip_is_refused():
    w = convex.WORKLOAD.loaded()
    model, ds = w.build_model(), w.dataset
    flat = parameters_to_vector(model.parameters()).detach()
    with pytest.raises(ValueError, match="clip=0"):
        convex.flat_gradient(model, w.loss, ds.X, ds.y, flat, clip=0)

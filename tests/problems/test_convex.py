"""Lab 03's problems: the same on every rank, autograd's gradients, clear refusals."""
import pytest
import torch
import torch.nn.functional as F
from torch.nn.utils import parameters_to_vector

from distlab.problems import convex


def test_the_same_seed_builds_the_same_problem():
    (m1, d1, _), (m2, d2, _) = convex.build("digits", 16, 3), convex.build("digits", 16, 3)
    assert torch.equal(parameters_to_vector(m1.parameters()),
                       parameters_to_vector(m2.parameters()))
    assert torch.equal(d1.X, d2.X)


def test_the_flat_gradient_is_autograd_on_the_given_parameters():
    model, ds, loss_fn = convex.build("linear_regression")
    P = sum(p.numel() for p in model.parameters())
    flat = torch.randn(P, generator=torch.Generator().manual_seed(0))
    loss, g = convex.flat_gradient(model, loss_fn, ds.X[:64], ds.y[:64], flat)
    w, b = flat[:-1].reshape(1, -1).clone().requires_grad_(), flat[-1:].clone().requires_grad_()
    expected = F.mse_loss(F.linear(ds.X[:64], w, b), ds.y[:64])
    expected.backward()
    torch.testing.assert_close(loss, expected.detach())
    torch.testing.assert_close(g, torch.cat([w.grad.flatten(), b.grad]))


def test_clipping_bounds_the_gradient_norm():
    model, ds, loss_fn = convex.build("linear_regression")
    flat = parameters_to_vector(model.parameters()).detach() + 10
    _, g = convex.flat_gradient(model, loss_fn, ds.X, ds.y, flat, clip=0.5)
    assert float(g.norm()) == pytest.approx(0.5, rel=1e-4)


def test_each_sparse_example_touches_nnz_features():
    ds, cols = convex.sparse_logistic(num_features=100, nnz=5, seed=1)
    assert cols.shape == (len(ds.y), 5)
    assert torch.equal(ds.X.ne(0).sum(1), torch.full((len(ds.y),), 5))


@pytest.mark.parametrize("call,match", [
    (lambda: convex.build("mnist"), "problem='mnist'"),
    (lambda: convex.build("digits", hidden=0), "hidden=0"),
    (lambda: convex.build("digits", seed=0.5), "seed=0.5"),
    (lambda: convex.sparse_logistic(num_features=10, nnz=11), "nnz=11"),
    (lambda: convex.sparse_logistic(num_features=True), "num_features=True")])
def test_bad_arguments_are_refused_by_name(call, match):
    with pytest.raises(ValueError, match=match):
        call()


def test_a_non_positive_clip_is_refused():
    model, ds, loss_fn = convex.build("linear_regression")
    flat = parameters_to_vector(model.parameters()).detach()
    with pytest.raises(ValueError, match="clip=0"):
        convex.flat_gradient(model, loss_fn, ds.X, ds.y, flat, clip=0)

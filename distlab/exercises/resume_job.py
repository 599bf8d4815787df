"""The small job that lab 07's part B resumes: built, trained, crashed and replayed.

Least squares on :func:`distlab.problems.data.linear_regression`, full batch, SGD with
momentum, and input noise drawn from torch's generator: so an exact resume needs the model,
the optimizer's momentum *and* the generator's state. :func:`crash` leaves what a job that
died leaves (``step_<N>.pt`` files, the newest perhaps torn); :func:`uninterrupted` is the
reference a resumed job must equal; :func:`resumed_without` replays a resume that forgot one
part of the state, so the checker can name what a student forgot.
"""
from __future__ import annotations

import copy
import io
import os

import torch

from distlab.problems.data import linear_regression
from distlab.problems.models import linear

JOB = {"num_features": 3, "num_examples": 32, "lr": 0.05, "momentum": 0.9, "noise": 0.3}
"""The job's sizes and rates."""


def build(seed: int):
    """The job's model, optimizer and data: the same in every process for ``seed``."""
    data = linear_regression(n=JOB["num_examples"], d=JOB["num_features"], seed=seed)
    model = linear(JOB["num_features"], seed=seed)     # also seeds torch's generator
    optimizer = torch.optim.SGD(model.parameters(), lr=JOB["lr"], momentum=JOB["momentum"])
    return model, optimizer, data.X, data.y


def train(model, optimizer, X, y, steps) -> list[float]:
    """Train ``steps`` steps; the loss of each (before its update)."""
    losses = []
    for _ in steps:
        noisy = X + JOB["noise"] * torch.randn_like(X)   # draws from torch's generator
        loss = ((model(noisy) - y) ** 2).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return losses


def crash(directory: str, every: int, crash_step: int, torn: str, seed: int) -> list[int]:
    """Run the job to ``crash_step``, saving ``step_N.pt`` every ``every`` steps, and leave
    what its crash leaves; return the steps whose checkpoints are whole."""
    saved = []
    with torch.random.fork_rng():      # the checker's own process keeps its generator
        model, optimizer, X, y = build(seed)
        for done in range(1, crash_step + 1):
            train(model, optimizer, X, y, range(1))
            if done % every:
                continue
            state = {"step": done, "model": model.state_dict(),
                     "optimizer": optimizer.state_dict(), "rng": torch.get_rng_state()}
            path = os.path.join(directory, f"step_{done}.pt")
            if done == crash_step and torn != "none":   # the crash: half the bytes written
                buffer = io.BytesIO()
                torch.save(state, buffer)
                with open(path if torn == "file" else path + ".tmp", "wb") as f:
                    f.write(buffer.getvalue()[: len(buffer.getvalue()) // 2])
            else:
                torch.save(state, path)
                saved.append(done)
    return saved


def uninterrupted(num_steps: int, seed: int) -> dict:
    """The reference: the job run to ``num_steps`` without a crash (losses, final params)."""
    with torch.random.fork_rng():
        model, optimizer, X, y = build(seed)
        losses = train(model, optimizer, X, y, range(num_steps))
        return {"losses": losses, "params": flat(model)}


def resumed_without(part: str, start: int, num_steps: int, seed: int) -> list[float]:
    """The losses of the job resumed at ``start`` in a fresh process, ``part`` not restored."""
    with torch.random.fork_rng():
        model, optimizer, X, y = build(seed)
        train(model, optimizer, X, y, range(start))
        # A copy: load_state_dict keeps the momentum tensors it is given.
        saved = copy.deepcopy({"model": model.state_dict(), "rng": torch.get_rng_state(),
                               "optimizer": optimizer.state_dict()})
        model, optimizer, X, y = build(seed)          # the fresh process
        if part != "model":
            model.load_state_dict(saved["model"])
        if part != "optimizer":
            optimizer.load_state_dict(saved["optimizer"])
        if part != "rng":
            torch.set_rng_state(saved["rng"])
        return train(model, optimizer, X, y, range(start, num_steps))


def flat(model) -> torch.Tensor:
    """The model's parameters as one vector."""
    return torch.nn.utils.parameters_to_vector(model.parameters()).detach()

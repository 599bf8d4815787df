"""Lab 05's assignment, part B's last check: one 1F1B training step of a small tanh MLP.

The model (4 pairs of ``Linear(4, 4)`` and ``Tanh``) is cut into contiguous stages, one per
real process; the student's ``pipeline_step`` runs its stage's order of work and must give
the loss and every stage's gradients of one backward pass of the unsplit model. Cost: each
microbatch's activation crosses each stage boundary once forward and its gradient once
backward (point to point, ``alpha + n·beta`` per message).
"""
from __future__ import annotations

import torch

from distlab.exercises import forbid
from distlab.model_parallel import pipeline

BATCH = 12
"""Examples in a step (the tensor-parallel block and the pipeline use the same count)."""
LAYERS, WIDTH = 8, 4
"""The pipeline's model: 4 pairs of Linear(4, 4) and Tanh, cut into contiguous stages."""


def _pipeline_problem_data():
    with torch.random.fork_rng():          # leave the caller's random state alone
        torch.manual_seed(7)
        model = torch.nn.Sequential(*[torch.nn.Linear(WIDTH, WIDTH) if k % 2 == 0 else
                                      torch.nn.Tanh() for k in range(LAYERS)])
    g = torch.Generator().manual_seed(8)
    return model, torch.randn(BATCH, WIDTH, generator=g), torch.randn(BATCH, WIDTH, generator=g)


def _stage(model, num_stages: int, stage: int):
    """The index of stage ``stage``'s first layer, and its layers (views of ``model``'s)."""
    layers = pipeline.partition(len(model), num_stages)[stage]
    return layers.start, torch.nn.Sequential(*list(model)[layers.start:layers.stop])


def run_pipeline_step(step_fn, num_microbatches, off_limits, why):
    """On each rank (one stage): the student's 1F1B step on its layers; what it computed."""
    import torch.distributed as dist
    stage, p = dist.get_rank(), dist.get_world_size()
    model, X, T = _pipeline_problem_data()
    _, layers = _stage(model, p, stage)
    order = pipeline.schedule("1f1b", p, num_microbatches, stage)
    inputs, targets = X.tensor_split(num_microbatches), T.tensor_split(num_microbatches)

    def loss_fn(out, i):          # microbatch i's share of the batch's mean squared error
        return ((out - targets[i]) ** 2).sum() / T.numel()
    with forbid(*off_limits, why=why):
        loss = step_fn(layers, order, list(inputs), loss_fn, None)
    return {"loss": float(loss) if isinstance(loss, (float, int, torch.Tensor)) else None,
            "grads": [None if q.grad is None else q.grad.clone() for q in layers.parameters()],
            "names": [n for n, _ in layers.named_parameters()]}


def pipeline_problem(stages, num_microbatches) -> str | None:
    """What is wrong with the stages' results against the unsplit model, or None."""
    model, X, T = _pipeline_problem_data()
    loss = ((model(X) - T) ** 2).mean()
    loss.backward()
    p, where = len(stages), f"1F1B step, {len(stages)} stages, {num_microbatches} microbatches"
    if stages[-1]["loss"] is None or abs(stages[-1]["loss"] - loss.item()) > 1e-5:
        return (f"{where}: the last stage returned loss {stages[-1]['loss']}, expected "
                f"{loss.item():.6g}, the sum of loss_fn(output, i) over the microbatches")
    for stage, res in enumerate(stages):
        first, layers = _stage(model, p, stage)
        for name, got, want in zip(res["names"], res["grads"],
                                   (q.grad for q in layers.parameters())):
            layer = f"stage {stage}, layer {first + int(name.split('.')[0])}'s {name.split('.')[1]}"
            if got is None or torch.count_nonzero(got) == 0:
                return (f"{where}: {layer} has no gradient: did stage {stage} receive the "
                        "gradient of its output from the next stage and call "
                        "output.backward(grad) for every microbatch?")
            if not torch.allclose(got, want, rtol=1e-4, atol=1e-6):
                return (f"{where}: {layer}'s gradient is {fmt(got)}, expected {fmt(want)} "
                        "(the gradients of all microbatches, accumulated)")
    return None


def fmt(t: torch.Tensor) -> str:
    """A tensor's first four values, for a message."""
    return "[" + ", ".join(f"{v:.4g}" for v in t.reshape(-1)[:4].tolist()) + (
        ", ...]" if t.numel() > 4 else "]")

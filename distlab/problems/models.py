"""Small models for the labs: built the same way on every rank from a seed."""
from __future__ import annotations

import torch
from torch import nn


def linear(num_features: int, seed: int = 0) -> nn.Module:
    """``nn.Linear(num_features, 1)``: linear regression."""
    torch.manual_seed(seed)
    return nn.Linear(num_features, 1)


def mlp(num_features: int = 64, hidden: int = 64, num_classes: int = 10, depth: int = 2,
        seed: int = 0) -> nn.Sequential:
    """A ReLU multi-layer perceptron: ``depth`` hidden layers of width ``hidden``."""
    torch.manual_seed(seed)
    layers, width = [], num_features
    for _ in range(depth):
        layers += [nn.Linear(width, hidden), nn.ReLU()]
        width = hidden
    layers.append(nn.Linear(width, num_classes))
    return nn.Sequential(*layers)


def num_parameters(model: nn.Module) -> int:
    """Number of distinct trainable parameters (tied weights counted once)."""
    return sum(p.numel() for p in {id(p): p for p in model.parameters()
                                   if p.requires_grad}.values())

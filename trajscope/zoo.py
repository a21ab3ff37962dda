"""Small model factories: import-spec targets for examples, the shipped sample runs and tests.

A run recorded with ``model_spec="trajscope.zoo:mlp"`` can be replayed anywhere trajscope is
installed, without unpickling anything.
"""
from __future__ import annotations

from typing import Sequence

from torch import nn

_ACTIVATIONS = {"relu": nn.ReLU, "tanh": nn.Tanh, "gelu": nn.GELU, "leaky_relu": nn.LeakyReLU, "abs": None}


class _Abs(nn.Module):
    def forward(self, x):
        return x.abs()


def _act(name: str) -> nn.Module:
    if name == "abs":
        return _Abs()
    try:
        return _ACTIVATIONS[name]()
    except KeyError:
        raise ValueError(f"unknown activation {name!r}; choose from {sorted(_ACTIVATIONS)}") from None


def mlp(sizes: Sequence[int] = (784, 512, 512, 10), activation: str = "relu", bias: bool = True) -> nn.Sequential:
    """Fully connected net ``sizes[0] -> ... -> sizes[-1]`` with ``activation`` between layers."""
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
        layers.append(nn.Linear(a, b, bias=bias))
        if i < len(sizes) - 2:
            layers.append(_act(activation))
    return nn.Sequential(*layers)


def linear(in_features: int = 8, out_features: int = 1, bias: bool = True) -> nn.Linear:
    """A single linear layer (linear regression)."""
    return nn.Linear(in_features, out_features, bias=bias)


def cnn(in_channels: int = 1, size: int = 8, channels: Sequence[int] = (8, 16), classes: int = 10,
        activation: str = "relu") -> nn.Sequential:
    """A small CNN for ``size × size`` images: 3×3 convs (padding 1) with 2×2 max-pooling, then a linear head."""
    layers: list[nn.Module] = []
    c, s = in_channels, size
    for out in channels:
        layers += [nn.Conv2d(c, out, 3, padding=1), _act(activation), nn.MaxPool2d(2)]
        c, s = out, s // 2
    layers += [nn.Flatten(), nn.Linear(c * s * s, classes)]
    return nn.Sequential(*layers)

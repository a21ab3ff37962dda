"""Small model factories: import-spec targets for examples, the shipped sample runs and tests.

A run recorded with ``model_spec="trajscope.zoo:mlp"`` can be replayed anywhere trajscope is
installed, without unpickling anything.
"""

from __future__ import annotations

from collections.abc import Sequence

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


def cnn(
    in_channels: int = 1, size: int = 8, channels: Sequence[int] = (8, 16), classes: int = 10, activation: str = "relu"
) -> nn.Sequential:
    """A small CNN for ``size × size`` images: 3×3 convs (padding 1) with 2×2 max-pooling, then a linear head."""
    layers: list[nn.Module] = []
    c, s = in_channels, size
    for out in channels:
        layers += [nn.Conv2d(c, out, 3, padding=1), _act(activation), nn.MaxPool2d(2)]
        c, s = out, s // 2
    layers += [nn.Flatten(), nn.Linear(c * s * s, classes)]
    return nn.Sequential(*layers)


class _BasicBlockNet(nn.Module):
    """conv-BN-ReLU stem, one ResNet basic block (conv-BN-ReLU-conv-BN + identity skip, ReLU), global
    average pooling and a linear head: the layout of ResNet-18's blocks, small."""

    def __init__(self, in_channels: int, width: int, classes: int) -> None:
        super().__init__()
        self.conv0 = nn.Conv2d(in_channels, width, 3, padding=1, bias=False)
        self.bn0 = nn.BatchNorm2d(width)
        self.conv1 = nn.Conv2d(width, width, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(width, classes)

    def forward(self, x):
        x = self.relu(self.bn0(self.conv0(x)))
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)) + x)
        return self.fc(self.pool(out).flatten(1))


def resnet_block(in_channels: int = 3, width: int = 4, classes: int = 3) -> nn.Module:
    """A small ResNet-style CNN with BatchNorm (see :class:`_BasicBlockNet`)."""
    return _BasicBlockNet(in_channels, width, classes)


class _MnistNet(nn.Module):
    """The layout of pytorch/examples' MNIST net (conv, conv, max-pool, dropout2d, fc, dropout, fc,
    log_softmax), sized by ``size`` (28 there) and ``channels``/``hidden`` (32, 64 / 128 there)."""

    def __init__(self, size: int, channels: Sequence[int], hidden: int, classes: int) -> None:
        super().__init__()
        c1, c2 = channels
        self.conv1 = nn.Conv2d(1, c1, 3, 1)
        self.conv2 = nn.Conv2d(c1, c2, 3, 1)
        self.dropout1 = nn.Dropout2d(0.25)
        self.dropout2 = nn.Dropout(0.5)
        self.fc1 = nn.Linear(c2 * ((size - 4) // 2) ** 2, hidden)
        self.fc2 = nn.Linear(hidden, classes)

    def forward(self, x):
        import torch.nn.functional as F

        x = F.relu(self.conv1(x))
        x = F.relu(self.conv2(x))
        x = F.max_pool2d(x, 2)
        x = self.dropout1(x)
        x = F.relu(self.fc1(x.flatten(1)))
        x = self.dropout2(x)
        return F.log_softmax(self.fc2(x), dim=1)


def mnist_net(size: int = 28, channels: Sequence[int] = (32, 64), hidden: int = 128, classes: int = 10) -> nn.Module:
    """pytorch/examples' MNIST net (see :class:`_MnistNet`)."""
    return _MnistNet(size, tuple(channels), hidden, classes)

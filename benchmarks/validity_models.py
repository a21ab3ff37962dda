"""Model factories of the label-validity suite (``benchmarks/validity_runs.py``).

The runs record ``model_spec="benchmarks.validity_models:<factory>"`` with JSON ``model_kwargs``, so
they replay from the repository root (``benchmarks`` is a namespace package there; the benchmark
scripts put the root on ``sys.path``; from a shell: ``PYTHONPATH=. trajscope analyze RUN --trust``).
Every factory builds its module from torch.nn pieces only, with nn.Linear layers wherever a node
should exist.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn

__all__ = ["mlp", "tiny_transformer", "TinyTransformer"]

_ACT = {"relu": nn.ReLU, "tanh": nn.Tanh, "gelu": nn.GELU}


def mlp(sizes: Sequence[int] = (1, 100, 1), activation: str = "tanh") -> nn.Sequential:
    """Fully connected ``sizes[0] -> ... -> sizes[-1]``, ``activation`` between the Linear layers.

    Module names are ``"0", "2", ...`` (the Linear layers of an nn.Sequential), as in trajscope.zoo.mlp.
    """
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
        layers.append(nn.Linear(int(a), int(b)))
        if i < len(sizes) - 2:
            layers.append(_ACT[activation]())
    return nn.Sequential(*layers)


class _Attention(nn.Module):
    """Multi-head self-attention from four nn.Linear projections (q, k, v, out): each a node layer."""

    def __init__(self, d_model: int, n_heads: int) -> None:
        super().__init__()
        self.h = n_heads
        self.q = nn.Linear(d_model, d_model)
        self.k = nn.Linear(d_model, d_model)
        self.v = nn.Linear(d_model, d_model)
        self.out = nn.Linear(d_model, d_model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, l, d = x.shape
        dh = d // self.h

        def heads(t: torch.Tensor) -> torch.Tensor:
            return t.reshape(b, l, self.h, dh).transpose(1, 2)  # (b, h, l, dh)

        q, k, v = heads(self.q(x)), heads(self.k(x)), heads(self.v(x))
        att = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(dh), dim=-1)
        y = (att @ v).transpose(1, 2).reshape(b, l, d)
        return self.out(y)


class _Block(nn.Module):
    def __init__(self, d_model: int, n_heads: int, d_ff: int) -> None:
        super().__init__()
        self.ln1 = nn.LayerNorm(d_model)
        self.attn = _Attention(d_model, n_heads)
        self.ln2 = nn.LayerNorm(d_model)
        self.ff1 = nn.Linear(d_model, d_ff)
        self.act = nn.GELU()
        self.ff2 = nn.Linear(d_ff, d_model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln1(x))
        return x + self.ff2(self.act(self.ff1(self.ln2(x))))


class TinyTransformer(nn.Module):
    """Token + position embeddings, pre-LN blocks, a Linear readout of the last position: logits (B, vocab)
    for ``nn.CrossEntropyLoss`` (one prediction per sequence: the per-sample loss Hessian has ``vocab``
    columns, not ``vocab × L``, which keeps the analysis cheap). Dim 0 is the sample dimension of every
    node layer's input and of the output, as trajscope's per-sample curvature needs."""

    def __init__(
        self, vocab: int = 16, seq_len: int = 8, d_model: int = 32, n_heads: int = 2, n_layers: int = 1, d_ff: int = 64
    ) -> None:
        super().__init__()
        self.tok = nn.Embedding(vocab, d_model)
        self.pos = nn.Embedding(seq_len, d_model)
        self.blocks = nn.ModuleList(_Block(d_model, n_heads, d_ff) for _ in range(n_layers))
        self.ln = nn.LayerNorm(d_model)
        self.head = nn.Linear(d_model, vocab)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        b, l = idx.shape
        x = self.tok(idx) + self.pos(torch.arange(l, device=idx.device))[None]
        for blk in self.blocks:
            x = blk(x)
        return self.head(self.ln(x[:, -1]))


def tiny_transformer(
    vocab: int = 16, seq_len: int = 8, d_model: int = 32, n_heads: int = 2, n_layers: int = 1, d_ff: int = 64
) -> TinyTransformer:
    """A 1-2 layer attention model (see :class:`TinyTransformer`)."""
    return TinyTransformer(vocab, seq_len, d_model, n_heads, n_layers, d_ff)

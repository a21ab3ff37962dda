"""Layer inputs as the rows that a node's parameters multiply (unfolded conv patches)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as TF
from torch import Tensor

from trajscope.nodes import NodeLayer


def _patches(x: Tensor, layer: NodeLayer) -> Tensor:
    """Layer input → ``(G, B, T, p)``: the vectors :math:`\\tilde x_{jt}` that row i of
    ``node_matrix`` multiplies (unfolded conv patches, + a ones column for the bias)."""
    B = x.shape[0]
    if layer.kind == "linear":
        X = x.reshape(B, -1, x.shape[-1]).unsqueeze(0)
    else:
        cv = layer.conv
        d = cv["dims"]
        pad = []
        for lo, hi in reversed(cv["pad"]):
            pad += [lo, hi]
        if any(pad):
            mode = cv["padding_mode"]
            x = TF.pad(x, pad, mode="constant" if mode == "zeros" else mode)
        for k in range(d):
            kk, dil, st = cv["kernel_size"][k], cv["dilation"][k], cv["stride"][k]
            x = x.unfold(2 + k, dil * (kk - 1) + 1, st)
            if dil > 1:
                x = x[..., ::dil]
        # x: (B, Cin, *O, *k) -> (G, B, T, Cin_g * prod(k)) in weight[i] C-order
        G = cv["groups"]
        Cin = x.shape[1]
        O = x.shape[2 : 2 + d]
        x = x.reshape(B, G, Cin // G, *O, *cv["kernel_size"])
        perm = [1, 0] + list(range(3, 3 + d)) + [2] + list(range(3 + d, 3 + 2 * d))
        X = x.permute(*perm).reshape(G, B, math.prod(O), -1)
    if layer.has_bias:
        X = torch.cat([X, X.new_ones(*X.shape[:-1], 1)], dim=-1)
    return X.contiguous()

"""Node layers of real architectures against float64 references: ``nn.MultiheadAttention``'s packed
``in_proj`` rows and ``out_proj`` rows, ``nn.Embedding`` rows, tied weights (counted once, the block
covering every use), and a layer that cannot be analysed (NaN and a warning, never a traceback).

Reference for every block: ``torch.func.hessian`` of the loss w.r.t. the node's own coordinates
(exact), and J_iᵀ (∂²L/∂f²) J_i from ``torch.func.jacrev`` (GGN); the node's coordinates are put
into the parameters by plain indexing here, independently of trajscope's node layout.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.func import functional_call, hessian, jacrev

from tests.helpers.calls import node_curvature
from trajscope.analysis.pipeline import recorded_node_layers
from trajscope.curvature.blocks import dense_blocks
from trajscope.curvature.node import twice_differentiable_attention
from trajscope.nodes import NodeLayer, find_node_layers, node_matrix, node_to_params

pytestmark = pytest.mark.filterwarnings("ignore:.*torch.jit.script.*:DeprecationWarning")
DT = torch.float64
RTOL = 1e-9


# ----------------------------------------------------------------------------- models
class Attn(nn.Module):
    """Token embedding -> MultiheadAttention (self-attention, batch first) -> tanh -> Linear head."""

    def __init__(self, vocab: int = 11, d: int = 6, heads: int = 2, classes: int = 3) -> None:
        super().__init__()
        self.emb = nn.Embedding(vocab, d)
        self.mha = nn.MultiheadAttention(d, heads, batch_first=True)
        self.head = nn.Linear(d, classes)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        h = self.emb(ids)
        a, _ = self.mha(h, h, h, need_weights=False)
        return self.head(torch.tanh(a + h))


class Tied(nn.Module):
    """A language model whose output layer is its embedding table (GPT-2's tying), in either order."""

    def __init__(self, vocab: int = 9, d: int = 5, decoder_first: bool = False) -> None:
        super().__init__()
        if decoder_first:
            self.out = nn.Linear(d, vocab, bias=False)
            self.emb = nn.Embedding(vocab, d)
        else:
            self.emb = nn.Embedding(vocab, d)
            self.out = nn.Linear(d, vocab, bias=False)
        self.out.weight = self.emb.weight
        self.mix = nn.Linear(d, d)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.out(torch.tanh(self.mix(self.emb(ids))))


def seq_ce(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))


def _data(vocab: int, classes: int, B: int = 4, T: int = 5, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (B, T), generator=g), torch.randint(0, classes, (B, T), generator=g)


def _params(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().to(DT) for k, v in model.named_parameters()}


# ----------------------------------------------------------------------------- references
def _with_node(params, layer: NodeLayer, i: int, th: torch.Tensor) -> dict[str, torch.Tensor]:
    """params with node i's coordinates (weight row i, or column i of a transposed weight, then the
    bias entry) set to th, by indexing."""
    p = dict(params)
    W = p[layer.weight].clone()
    n = W.shape[0] if layer.transposed else W[i].numel()
    W = W.index_put(
        (torch.arange(n), torch.tensor(i)) if layer.transposed else (torch.tensor(i),), th[:n].reshape(W[i].shape)
    )
    p[layer.weight] = W
    if layer.bias is not None:
        p[layer.bias] = p[layer.bias].index_put((torch.tensor(i),), th[n:].reshape(()))
    return p


def _coords(params, layer: NodeLayer, i: int) -> torch.Tensor:
    W = params[layer.weight]
    w = W[:, i] if layer.transposed else W[i].reshape(-1)
    return torch.cat([w, params[layer.bias][i : i + 1]]) if layer.bias is not None else w


def ref_exact(model, params, x, y, loss_fn, layer, i):
    with twice_differentiable_attention():  # torch.func's forward AD has no rule for the fused kernels either
        return hessian(lambda th: loss_fn(functional_call(model, _with_node(params, layer, i, th), (x,)), y))(
            _coords(params, layer, i)
        )


def ref_ggn(model, params, x, y, loss_fn, layer, i):
    th0 = _coords(params, layer, i)
    f0 = functional_call(model, params, (x,))
    with twice_differentiable_attention():
        J = jacrev(lambda th: functional_call(model, _with_node(params, layer, i, th), (x,)))(th0).reshape(
            f0.numel(), -1
        )
    Hf = hessian(lambda f: loss_fn(f, y))(f0).reshape(f0.numel(), f0.numel())
    return J.T @ Hf @ J


def _check_blocks(model, x, y, loss_fn, layer_names, nodes, kind):
    params = _params(model.to(DT))
    layers = find_node_layers(model)
    cr = node_curvature(model, params, {}, x, y, loss_fn, layers, kind=kind)
    ref = ref_exact if kind == "exact" else ref_ggn
    by_name = {l.name: l for l in layers}
    for name in layer_names:
        layer = by_name[name]
        blocks = dense_blocks(cr.factors[name], nodes)
        for j, i in enumerate(nodes):
            H = ref(model, params, x, y, loss_fn, layer, i)
            scale = max(float(H.abs().max()), 1e-300)
            assert float((blocks[j] - H).abs().max()) <= RTOL * scale, (name, i, kind)
            ev = torch.linalg.eigvalsh(H).flip(0)
            got = cr.eigvals[name][i]
            assert torch.allclose(got[: len(ev)], ev, rtol=0, atol=1e-8 * scale), (name, i, kind)
    return cr, by_name


# ----------------------------------------------------------------------------- finding the layers
def test_find_layers_of_attention_and_embedding():
    layers = {l.name: l for l in find_node_layers(Attn())}
    assert list(layers) == ["emb", "mha.in_proj", "mha.out_proj", "head"]
    emb, inp, out, head = layers.values()
    assert (emb.kind, emb.route, emb.n_nodes, emb.node_dim, emb.bias) == ("embedding", "param", 11, 6, None)
    assert (inp.weight, inp.bias, inp.n_nodes, inp.node_dim, inp.route) == (
        "mha.in_proj_weight",
        "mha.in_proj_bias",
        18,
        7,
        "param",
    )
    assert (out.weight, out.bias, out.n_nodes, out.node_dim, out.route) == (
        "mha.out_proj.weight",
        "mha.out_proj.bias",
        6,
        7,
        "param",
    )
    assert head.route == "hook"
    assert [l.name for l in find_node_layers(Attn(), include=["mha.*"])] == ["mha.in_proj", "mha.out_proj"]
    # separate q/k/v projections (kdim != embed_dim): no packed rows to take
    assert [l.name for l in find_node_layers(nn.MultiheadAttention(4, 2, kdim=3, vdim=3))] == ["out_proj"]


@pytest.mark.parametrize("decoder_first", [False, True])
def test_tied_weight_is_one_layer(decoder_first):
    layers = find_node_layers(Tied(decoder_first=decoder_first))
    shared = [l for l in layers if l.name in ("emb", "out")]
    assert len(shared) == 1, "a tied weight is counted once"
    (l,) = shared
    first = "out" if decoder_first else "emb"
    assert l.name == first and l.weight == f"{first}.weight" and l.route == "param"
    assert l.tied == (("emb" if decoder_first else "out") + ".weight",)
    assert l.kind == ("linear" if decoder_first else "embedding")


def test_node_layout_round_trip_and_old_tables():
    g = torch.Generator().manual_seed(0)
    W, b = torch.randn(5, 3, generator=g), torch.randn(3, generator=g)  # (fan_in, N): HF Conv1D
    layer = NodeLayer("c", "linear", "c.weight", "c.bias", 3, 6, transposed=True)
    M = node_matrix({"c.weight": W, "c.bias": b}, layer)
    assert torch.equal(M[1], torch.cat([W[:, 1], b[1:2]]))
    back = node_to_params(M[None], layer, W.shape)
    assert torch.equal(back["c.weight"][0], W) and torch.equal(back["c.bias"][0], b)

    # a run recorded before these fields existed: a table without transposed / route / tied
    class _Run:
        attrs = {
            "model": {
                "node_layers": [
                    {
                        "name": "0",
                        "kind": "linear",
                        "weight": "0.weight",
                        "bias": "0.bias",
                        "n_nodes": 2,
                        "node_dim": 4,
                        "conv": None,
                    }
                ]
            }
        }

    (old,) = recorded_node_layers(_Run())
    assert (old.transposed, old.route, old.tied) == (False, "hook", ())


# ----------------------------------------------------------------------------- blocks
@pytest.mark.parametrize("kind", ["exact", "ggn"])
def test_attention_and_embedding_blocks(kind):
    torch.manual_seed(0)
    model = Attn().to(DT)
    x, y = _data(11, 3)
    # in_proj rows of the query, key and value blocks (0..5, 6..11, 12..17); out_proj; embedding rows
    _check_blocks(model, x, y, seq_ce, ["mha.in_proj"], [0, 7, 13, 17], kind)
    _check_blocks(model, x, y, seq_ce, ["mha.out_proj", "head"], [0, 2], kind)
    present = sorted(set(x.flatten().tolist()))
    absent = [r for r in range(11) if r not in present]
    cr, _ = _check_blocks(model, x, y, seq_ce, ["emb"], present[:2] + absent[:1], kind)
    if absent:  # a token absent from the batch: its row does not reach the loss
        assert float(dense_blocks(cr.factors["emb"], absent).abs().max()) == 0.0


@pytest.mark.parametrize("kind", ["exact", "ggn"])
@pytest.mark.parametrize("decoder_first", [False, True])
def test_tied_blocks_cover_every_use(kind, decoder_first):
    torch.manual_seed(0)
    model = Tied(decoder_first=decoder_first).to(DT)
    x, y = _data(9, 9)
    name = "out" if decoder_first else "emb"
    cr, layers = _check_blocks(model, x, y, seq_ce, [name], [0, 3, 8], kind)
    _check_blocks(model, x, y, seq_ce, ["mix"], [1, 4], kind)
    # the block covers both uses: with the weight untied into two copies, one use alone gives another block
    params = _params(model)
    untied = Tied(decoder_first=decoder_first).to(DT)
    untied.out.weight = nn.Parameter(params[f"{name}.weight"].clone())
    untied.emb.weight = nn.Parameter(params[f"{name}.weight"].clone())
    untied.mix.load_state_dict({"weight": params["mix.weight"], "bias": params["mix.bias"]})
    one_use = ref_exact(
        untied, _params(untied), x, y, seq_ce, NodeLayer(name, "linear", f"{name}.weight", None, 9, 5), 3
    )
    both = ref_exact(model, params, x, y, seq_ce, layers[name], 3)
    assert float((one_use - both).abs().max()) > 1e-3 * float(both.abs().max())


def test_layer_that_cannot_be_analysed_is_nan_with_a_warning():
    torch.manual_seed(0)
    model = Attn().to(DT)
    x, y = _data(11, 3)
    layers = find_node_layers(model)
    # a memory bound (16 x 256 B) under in_proj's blocks (18 x 7 x 7 float64 = 7056 B) and above the others'
    with pytest.warns(RuntimeWarning, match="no curvature for node layer 'mha.in_proj'"):
        cr = node_curvature(model, _params(model), {}, x, y, seq_ce, layers, kind="exact", max_tile_bytes=256)
    assert torch.isnan(cr.eigvals["mha.in_proj"]).all()
    assert cr.factors["mha.in_proj"].form == "nan"
    for name in ("emb", "mha.out_proj", "head"):  # the other layers are analysed as usual
        assert torch.isfinite(cr.eigvals[name]).all(), name


def test_diverged_checkpoint_is_nan_without_warning():
    torch.manual_seed(0)
    model = Attn().to(DT)
    x, y = _data(11, 3)
    params = _params(model)
    params["mha.in_proj_weight"] = params["mha.in_proj_weight"].clone().fill_(float("inf"))
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # a diverged checkpoint is data, not a failure
        cr = node_curvature(model, params, {}, x, y, seq_ce, find_node_layers(model), kind="ggn")
    for name in ("emb", "mha.in_proj", "mha.out_proj", "head"):
        assert torch.isnan(cr.eigvals[name]).all(), name

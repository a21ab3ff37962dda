"""Hugging Face models end to end, on real ``transformers`` models from tiny configs (nothing is
downloaded): ``Recorder(..., loss="model")`` in a hand-written loop and ``TrajscopeCallback`` in a
``transformers.Trainer`` with gradient accumulation, analysed in float64.

References: the loss the model itself computes (``model(**batch).loss``), ``torch.func.hessian``
of that true loss w.r.t. a node's coordinates (a GPT-2 ``Conv1D`` column + bias, an embedding row
tied with the LM head), and a plain SGD step (θ_{t+1} = θ_t − lr ∇L) for the batch of each step.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import transformers  # the dev extra installs it (and accelerate, which the Trainer needs)
from torch.func import functional_call, hessian
from transformers import GPT2Config, GPT2LMHeadModel

import trajscope
from tests.helpers.calls import node_curvature
from trajscope import modelloss, trust
from trajscope.curvature.blocks import dense_blocks
from trajscope.curvature.node import twice_differentiable_attention
from trajscope.errors import TrajscopeError
from trajscope.integrations.huggingface import TrajscopeCallback, from_config
from trajscope.io import specs
from trajscope.nodes import find_node_layers

pytestmark = [
    pytest.mark.filterwarnings("ignore:.*loss_type=None.*"),
    pytest.mark.filterwarnings("ignore:.*torch.jit.script.*:DeprecationWarning"),
]
DT = torch.float64
VOCAB, T, B = 64, 8, 4


def tiny_config(**kw) -> GPT2Config:
    base = dict(
        vocab_size=VOCAB,
        n_positions=16,
        n_embd=16,
        n_layer=1,
        n_head=2,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        bos_token_id=0,
        eos_token_id=0,
        pad_token_id=0,
    )
    return GPT2Config(**{**base, **kw})


def lm_batches(n: int, b: int = B, seed: int = 1) -> list[dict[str, torch.Tensor]]:
    """Token batches whose labels are the inputs, with the first tokens of some rows ignored (-100)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        ids = torch.randint(0, VOCAB, (b, T), generator=g)
        labels = ids.clone()
        labels[::3, :3] = -100
        out.append({"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels})
    return out


def true_loss(model: torch.nn.Module, params: dict, batch: dict) -> torch.Tensor:
    """The causal-LM loss of the model's logits in the analysis dtype, written out here: position t
    predicts label t+1, ignored labels -100, the mean over the counted tokens. (The model's own
    ``outputs.loss`` computes it in float32 whatever the logits: the test checks it agrees to that.)"""
    logits = functional_call(model, params, (), {k: v for k, v in batch.items() if k != "labels"}).logits
    labels = batch["labels"]
    return torch.nn.functional.cross_entropy(
        logits[:, :-1].reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1), ignore_index=-100
    )


# ----------------------------------------------------------------------------- the loss
def test_model_loss_reproduces_outputs_loss_of_each_head():
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(2)
    ids = torch.randint(1, VOCAB, (3, T), generator=g)
    cases = []
    lm = GPT2LMHeadModel(tiny_config())
    labels = ids.clone()
    labels[0, :4] = -100
    cases.append((lm, labels, "causal_lm"))
    tok = transformers.GPT2ForTokenClassification(tiny_config(num_labels=5))
    tl = torch.randint(0, 5, (3, T), generator=g)
    tl[1, 2] = -100
    cases.append((tok, tl, "token_classification"))
    for problem, n, lab in [
        ("single_label_classification", 4, torch.tensor([0, 3, 1])),
        ("multi_label_classification", 4, torch.rand(3, 4, generator=g).round()),
        ("regression", 1, torch.randn(3, generator=g)),
        (None, 1, torch.randn(3, generator=g)),
        (None, 4, torch.tensor([2, 0, 1])),
    ]:
        seq = transformers.GPT2ForSequenceClassification(tiny_config(num_labels=n, problem_type=problem))
        cases.append((seq, lab, "sequence_classification"))
    bert = transformers.BertForMaskedLM(
        transformers.BertConfig(
            vocab_size=VOCAB, hidden_size=8, num_hidden_layers=1, num_attention_heads=2, intermediate_size=8
        )
    )
    ml = torch.full_like(ids, -100)
    ml[:, 2] = ids[:, 2]
    cases.append((bert, ml, "masked_lm"))
    for model, lab, task in cases:
        model.eval()
        loss_fn = modelloss.for_model(model)
        assert loss_fn.task == task
        with torch.no_grad():
            out = model(input_ids=ids, labels=lab)
            replay = loss_fn(model(input_ids=ids).logits, lab)
        assert replay.item() == pytest.approx(out.loss.item(), rel=1e-6, abs=0), (type(model).__name__, task)
        # the description a run stores rebuilds the same loss
        rebuilt = specs.build_loss(loss_fn.describe())
        assert rebuilt(out.logits, lab).item() == pytest.approx(replay.item(), rel=1e-12)


def test_unsupported_model_loss_is_one_line():
    qa = transformers.GPT2ForQuestionAnswering(tiny_config())
    with pytest.raises(TrajscopeError, match="loss='model' supports .*GPT2ForQuestionAnswering") as e:
        trajscope.Recorder("unused", qa, torch.optim.SGD(qa.parameters(), lr=0.1), loss="model")
    assert "\n" not in str(e.value)
    with pytest.raises(ValueError, match="only loss named by a string is 'model'"):
        trajscope.Recorder("unused", qa, torch.optim.SGD(qa.parameters(), lr=0.1), loss="mse")


def test_model_factory_and_loss_are_allow_listed():
    assert trust.allowed("trajscope.modelloss:ModelLoss")
    assert trust.allowed("trajscope.integrations.huggingface:from_config")
    with pytest.raises(TrajscopeError, match="not a transformers model class"):
        from_config("AutoTokenizer", {})


# ----------------------------------------------------------------------------- a hand-written loop
@pytest.mark.slow
def test_gpt2_hand_loop_end_to_end(tmp_path, other_user):
    torch.manual_seed(0)
    model = GPT2LMHeadModel(tiny_config())
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    data = lm_batches(3)
    path = tmp_path / "run"
    with other_user():  # a run from elsewhere: replays without --trust (trajscope's own adapters)
        with trajscope.Recorder(path, model, opt, loss="model") as rec:
            for batch in data:
                out = model(**batch)
                opt.zero_grad()
                out.loss.backward()
                rec.batch(batch)  # the recorder takes outputs.loss through its hook
                opt.step()
    assert rec.failed is None
    run = trajscope.open_run(path)
    meta = run.attrs["model"]
    assert meta["spec"] == "trajscope.integrations.huggingface:from_config" and meta["exported"] is None
    assert meta["kwargs"]["architecture"] == "GPT2LMHeadModel" and meta["kwargs"]["config"]["n_embd"] == 16
    assert run.attrs["loss"]["kwargs"]["task"] == "causal_lm"
    # trajscope info: a Conv1D layer's node count is its weight's dim 1, the config is summarised
    from trajscope.cli.info import summary_tables

    overview, table = summary_tables(run)
    counts = dict(zip(table.columns[0]._cells, table.columns[3]._cells))
    assert counts["transformer.h.0.attn.c_attn.weight"] == "48" and counts["transformer.wte.weight"] == "64"
    assert counts["transformer.h.0.attn.c_attn.bias"] == ""
    assert any("<gpt2 config" in str(c) for c in overview.columns[1]._cells)
    ck0 = run.checkpoint(0)
    assert set(ck0.inputs) == {"input_ids", "attention_mask"} and torch.equal(ck0.targets, data[0]["labels"])

    # a Conv1D layer (hook route) and the position embedding (parameter route) through the pipeline,
    # AdamW's preconditioned spectra included; the tied token embedding's 1024 products are checked once below
    res = trajscope.analyze(
        path,
        dtype="float64",
        curvature="exact",
        progress=False,
        modules=["transformer.h.0.attn.c_attn", "transformer.wpe"],
    )[path]
    assert list(res.steps) == [0, 1]
    mismatch = res.global_series("loss_mismatch")
    assert np.all(mismatch < 1e-5), mismatch
    names = [d["name"] for d in meta["node_layers"]]
    assert "lm_head" not in names and names[:2] == ["transformer.wte", "transformer.wpe"]

    # the blocks at step 0 against the Hessian of the model's own loss, in float64
    replay = run.model().to(DT)
    ref = GPT2LMHeadModel(tiny_config()).to(DT).eval()  # outputs.loss, tied lm_head
    params = {k: v.to(DT) for k, v in ck0.params.items()}
    batch = {**ck0.inputs, "labels": ck0.targets}
    assert true_loss(ref, params, batch).item() == pytest.approx(float(run.losses[0]), rel=1e-5)
    with torch.no_grad():
        assert functional_call(ref, params, (), batch).loss.item() == pytest.approx(
            true_loss(ref, params, batch).item(), rel=1e-6
        )
    layers = {l.name: l for l in find_node_layers(replay, include=["transformer.h.0.attn.c_attn", "transformer.wte"])}
    assert layers["transformer.wte"].tied == ("lm_head.weight",)
    cr = node_curvature(replay, params, {}, ck0.inputs, ck0.targets, run.loss_fn(), list(layers.values()), kind="exact")
    conv = layers["transformer.h.0.attn.c_attn"]
    assert conv.transposed and conv.n_nodes == 48 and conv.node_dim == 17

    def conv_node(th, i):
        p = dict(params)
        p[conv.weight] = p[conv.weight].index_put((torch.arange(p[conv.weight].shape[0]), torch.tensor(i)), th[:-1])
        p[conv.bias] = p[conv.bias].index_put((torch.tensor(i),), th[-1])
        return p

    def wte_row(th, r):
        p = dict(params)
        p["transformer.wte.weight"] = p["transformer.wte.weight"].index_put((torch.tensor(r),), th)
        return p

    hess_max, hess_min = (
        res.node("transformer.h.0.attn.c_attn", "hess_max", 0),
        res.node("transformer.h.0.attn.c_attn", "hess_min", 0),
    )
    assert np.isfinite(res.node("transformer.wpe", "hess_max")).all()
    assert np.isfinite(res.node("transformer.wpe", "spectral_radius")).all()
    tokens = sorted(set(ck0.inputs["input_ids"].flatten().tolist()))
    absent = next(r for r in range(VOCAB) if r not in tokens)  # reaches the loss through the LM head only
    for layer, make, nodes in [
        (conv, conv_node, [0, 17, 40]),
        (layers["transformer.wte"], wte_row, tokens[:2] + [absent]),
    ]:
        blocks = dense_blocks(cr.factors[layer.name], nodes)
        for j, i in enumerate(nodes):
            w = params[layer.weight]
            th0 = torch.cat([w[:, i], params[layer.bias][i : i + 1]]) if layer.transposed else w[i]
            with twice_differentiable_attention():  # sdpa's math backend: forward AD for torch.func
                H = hessian(lambda th: true_loss(ref, make(th, i), batch))(th0)
            scale = float(H.abs().max())
            assert scale > 0
            assert float((blocks[j] - H).abs().max()) <= 1e-9 * scale + 1e-13, (layer.name, i)
            if layer is conv:  # what the analysis stored (float32): this block's extremes
                ev = torch.linalg.eigvalsh(H)
                assert hess_max[i] == pytest.approx(float(ev[-1]), rel=1e-5, abs=1e-7 * scale)
                assert hess_min[i] == pytest.approx(float(ev[0]), rel=1e-5, abs=1e-7 * scale)


# ----------------------------------------------------------------------------- the Trainer
class _Tokens(torch.utils.data.Dataset):
    def __init__(self, n: int = 16) -> None:
        (b,) = lm_batches(1, b=n, seed=3)
        self.ids, self.labels = b["input_ids"], b["labels"]

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[i], "labels": self.labels[i]}


def _train(tmp_path, steps: int = 3, **args) -> tuple:
    torch.manual_seed(0)
    model = GPT2LMHeadModel(tiny_config())
    targs = transformers.TrainingArguments(
        output_dir=str(tmp_path / "out"),
        per_device_train_batch_size=2,
        gradient_accumulation_steps=2,
        max_steps=steps,
        report_to=[],
        use_cpu=True,
        logging_steps=1,
        save_strategy="no",
        disable_tqdm=True,
        dataloader_num_workers=0,
        seed=0,
        **args,
    )
    path = tmp_path / "run"
    cb = TrajscopeCallback(path)
    trainer = transformers.Trainer(model=model, args=targs, train_dataset=_Tokens(), callbacks=[cb])
    trainer.train()
    logged = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    return path, cb, logged


@pytest.mark.slow
def test_trainer_callback_with_gradient_accumulation(tmp_path):
    lr = 0.05
    path, cb, logged = _train(
        tmp_path, optim="sgd", learning_rate=lr, lr_scheduler_type="constant", max_grad_norm=0.0, weight_decay=0.0
    )
    assert cb.failed is None and cb.recorder.failed is None
    run = trajscope.open_run(path)
    assert list(run.steps) == [0, 1, 2]
    # the loss of each step is the one the Trainer trained on and logged
    assert np.allclose(run.losses, logged, rtol=1e-6, atol=0), (run.losses, logged)
    # GPT2LMHeadModel has no loss_type: the Trainer divides by the labels before the shift
    assert run.attrs["loss"]["kwargs"]["denominator"] == "labels"
    model, loss_fn = run.model().to(DT), run.loss_fn()
    for step in (0, 1):
        ck = run.checkpoint(step)
        assert ck.inputs["input_ids"].shape == (4, T)  # both micro-batches of the step
        # the recorded batch is the one of the step: an SGD step on its replayed loss gives θ_{t+1}
        params = {k: v.to(DT).requires_grad_(True) for k, v in ck.params.items()}
        loss = loss_fn(functional_call(model, params, (), dict(ck.inputs)), ck.targets)
        assert loss.item() == pytest.approx(ck.loss, rel=1e-5)
        grads = torch.autograd.grad(loss, list(params.values()))
        nxt = run.params(step + 1)
        for (name, p), g in zip(params.items(), grads):
            want = p.detach() - lr * g
            assert torch.allclose(nxt[name].to(DT), want, rtol=0, atol=1e-5), name
    res = trajscope.analyze(
        path, dtype="float64", sharpness=False, progress=False, modules=["transformer.h.0.mlp.c_fc", "transformer.wte"]
    )[path]
    assert np.all(res.global_series("loss_mismatch") < 1e-5)
    assert np.isfinite(res.node("transformer.h.0.mlp.c_fc", "hess_max")).all()
    assert np.isfinite(res.node("transformer.wte", "hess_max")).all()


def test_trainer_callback_bf16_on_cpu(tmp_path):
    path, cb, logged = _train(tmp_path, steps=2, bf16=True, learning_rate=1e-2)
    run = trajscope.open_run(path)
    assert cb.failed is None and list(run.steps) == [0, 1]
    assert np.allclose(run.losses, logged, rtol=1e-6, atol=0)
    res = trajscope.analyze(
        path, dtype="float64", sharpness=False, progress=False, modules=["transformer.h.0.mlp.c_proj"]
    )[path]
    # the replay is float64 without autocast: close to the bf16 loss, and the fidelity check says how close
    gap = res.global_series("loss_mismatch")
    assert np.all(gap < 0.05) and math.isfinite(float(gap[0]))


def test_trainer_callback_refuses_an_existing_run_before_training(tmp_path, capsys):
    path, _, _ = _train(tmp_path, steps=1)
    # the command line analyses it (the loss is the model's: no --loss, no --trust)
    from trajscope.cli.main import main

    assert (
        main(
            [
                "analyze",
                str(path),
                "--modules",
                "transformer.h.0.mlp.c_proj",
                "--no-sharpness",
                "--dtype",
                "float64",
                "--no-progress",
            ]
        )
        == 0
    )
    assert "does not say how its loss is computed" not in capsys.readouterr().out
    assert (path / "analysis.zarr").is_dir() and list(trajscope.open_run(path).steps) == [0]
    torch.manual_seed(0)
    model = GPT2LMHeadModel(tiny_config())
    targs = transformers.TrainingArguments(
        output_dir=str(tmp_path / "out2"),
        max_steps=1,
        report_to=[],
        use_cpu=True,
        save_strategy="no",
        disable_tqdm=True,
    )
    trainer = transformers.Trainer(
        model=model, args=targs, train_dataset=_Tokens(), callbacks=[TrajscopeCallback(path)]
    )
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(TrajscopeError, match="already holds a recorded run"):
        trainer.train()
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())

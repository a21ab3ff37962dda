"""Which code a recorded run may make trajscope import and call: "a run is data".

A run names code in its root attributes: the model factory (``model.spec``), the loss class or
function (``loss.class`` / ``loss.function``) and an exported program (``model.pt2``, whose
loading unpickles). A run received from someone else must run nothing the user did not choose,
so each of these is imported, called or loaded only when one of these holds:

1. the user trusts the run: ``--trust`` / ``trust=True``;
2. the user named the code themselves: ``--model`` / ``--loss`` (then the run's spec is not used);
3. the spec is in the allow-list below: callables that build a module from JSON arguments and
   cannot reach the file system, the network or a shell (``torch.nn`` loss classes and
   ``torch.nn.functional`` losses by exact name, ``trajscope.zoo`` factories, and trajscope's own
   adapters for Hugging Face models: the model-loss class and the factory that builds a
   ``transformers`` model from its recorded config, never downloading anything);
4. the run carries a valid signature made by this user's key: the Recorder signs the run's
   description of its model and loss (and the SHA-256 of the exported program) with HMAC-SHA256
   under a per-user key kept outside every run, so runs recorded on this machine by this user
   replay without a flag, while a copied description, an edited one or a swapped program fails.

Nothing is imported before this check, so a spec pointing at a module with import-time side
effects executes nothing. The key lives at ``$TRAJSCOPE_KEY_FILE``, else
``$XDG_CONFIG_HOME/trajscope/signing.key`` (default ``~/.config``), created on first use with
mode 0600; deleting it makes every earlier run foreign.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import secrets
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from trajscope.errors import TrajscopeError

SIGNATURE_VERSION = 1

_TORCH_LOSS_CLASSES = frozenset(
    {
        "L1Loss",
        "MSELoss",
        "CrossEntropyLoss",
        "NLLLoss",
        "BCELoss",
        "BCEWithLogitsLoss",
        "HuberLoss",
        "SmoothL1Loss",
        "KLDivLoss",
        "PoissonNLLLoss",
        "GaussianNLLLoss",
        "SoftMarginLoss",
        "MultiLabelSoftMarginLoss",
        "MultiLabelMarginLoss",
        "MultiMarginLoss",
        "HingeEmbeddingLoss",
        "MarginRankingLoss",
        "CosineEmbeddingLoss",
        "TripletMarginLoss",
        "CTCLoss",
    }
)
_TORCH_LOSS_FUNCTIONS = frozenset(
    {
        "l1_loss",
        "mse_loss",
        "cross_entropy",
        "nll_loss",
        "binary_cross_entropy",
        "binary_cross_entropy_with_logits",
        "huber_loss",
        "smooth_l1_loss",
        "kl_div",
        "poisson_nll_loss",
        "gaussian_nll_loss",
        "soft_margin_loss",
        "multilabel_soft_margin_loss",
        "multi_margin_loss",
    }
)
_ZOO_FACTORIES = frozenset({"mlp", "linear", "cnn"})

#: spec -> kind of callable, for every spec that needs no trust
ALLOWED: dict[str, str] = {
    **{f"{mod}:{name}": "loss class" for mod in ("torch.nn", "torch.nn.modules.loss") for name in _TORCH_LOSS_CLASSES},
    **{f"torch.nn.functional:{name}": "loss function" for name in _TORCH_LOSS_FUNCTIONS},
    **{f"trajscope.zoo:{name}": "model factory" for name in _ZOO_FACTORIES},
    "trajscope.modelloss:ModelLoss": "model loss",
    "trajscope.integrations.huggingface:from_config": "model factory",
}


def loss_spec(desc: Any) -> str | None:
    """The code a run's loss description names (``class`` or ``function``); None if it names none."""
    spec = (desc.get("class") or desc.get("function")) if isinstance(desc, Mapping) else None
    return spec if isinstance(spec, str) else None


def allowed(spec: str | None) -> bool:
    """Whether ``spec`` may be imported and called without trust (exact match, no prefixes)."""
    return isinstance(spec, str) and spec in ALLOWED


# --------------------------------------------------------------------------- the user's key
def key_path() -> Path:
    if os.environ.get("TRAJSCOPE_KEY_FILE"):
        return Path(os.environ["TRAJSCOPE_KEY_FILE"])
    base = os.environ.get("XDG_CONFIG_HOME") or os.path.join(os.path.expanduser("~"), ".config")
    return Path(base) / "trajscope" / "signing.key"


def _key(create: bool) -> bytes | None:
    """This user's signing key; created (mode 0600) when ``create`` and missing; None if unavailable."""
    path = key_path()
    try:
        return bytes.fromhex(path.read_text().strip())
    except FileNotFoundError:
        if not create:
            return None
    except (OSError, ValueError):
        return None
    try:
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(secrets.token_hex(32) + "\n")
    except FileExistsError:  # another process made it first
        pass
    except OSError:
        return None
    return _key(create=False)


# --------------------------------------------------------------------------- signing
def _message(model: Mapping[str, Any], loss: Any, exported_sha256: str | None) -> bytes:
    """The signed content: every field of the run that names code, canonical JSON."""
    body = {
        "v": SIGNATURE_VERSION,
        "model_spec": model.get("spec"),
        "model_kwargs": model.get("kwargs"),
        "exported": model.get("exported"),
        "exported_sha256": exported_sha256,
        "loss": loss,
    }
    return json.dumps(body, sort_keys=True, separators=(",", ":"), default=str).encode()


def file_sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def sign(model: Mapping[str, Any], loss: Any, exported_sha256: str | None = None) -> dict[str, Any] | None:
    """The ``signature`` attribute for a run description, or None when no key can be had."""
    key = _key(create=True)
    if key is None:
        return None
    mac = hmac.new(key, _message(model, loss, exported_sha256), hashlib.sha256).hexdigest()
    return {
        "v": SIGNATURE_VERSION,
        "hmac_sha256": mac,
        "exported_sha256": exported_sha256,
        "key_id": hashlib.sha256(key).hexdigest()[:16],
    }


def signed_by_me(attrs: Mapping[str, Any]) -> bool:
    """Whether the run's description of its code carries a valid signature under this user's key."""
    sig = attrs.get("signature")
    key = _key(create=False)
    if not isinstance(sig, Mapping) or key is None or not isinstance(sig.get("hmac_sha256"), str):
        return False
    model = attrs.get("model") if isinstance(attrs.get("model"), Mapping) else {}
    want = hmac.new(key, _message(model, attrs.get("loss"), sig.get("exported_sha256")), hashlib.sha256).hexdigest()
    return hmac.compare_digest(want, sig["hmac_sha256"])


# --------------------------------------------------------------------------- the decision
class TrustPolicy:
    """The trust decision for one run: ``require`` raises before anything named in the run is used."""

    def __init__(self, run_path: Path, attrs: Mapping[str, Any], trust: bool = False) -> None:
        self.run_path, self.attrs, self.trust = run_path, attrs, bool(trust)
        self._signed: bool | None = None

    @property
    def signed(self) -> bool:
        if self._signed is None:
            self._signed = signed_by_me(self.attrs)
        return self._signed

    def require(self, what: str, spec: str, option: str) -> None:
        """Allow importing and calling ``spec`` (the run's ``what``), or raise one line saying how."""
        if self.trust or allowed(spec) or self.signed:
            return
        raise TrajscopeError(
            f"{self.run_path}: rebuilding its {what} would import and call {spec!r}, named inside the run, and the "
            f"run is not signed by you (a run is data: code named in it runs only if you choose it): pass --trust "
            f"(trust=True) if you trust where the run came from, or {option} to name the code yourself"
        )

    def require_program(self, path: Path) -> None:
        """Allow loading the exported program at ``path`` (unpickling): trusted, or signed with its hash."""
        if self.trust:
            return
        sig = self.attrs.get("signature")
        if (
            self.signed
            and isinstance(sig, Mapping)
            and sig.get("exported_sha256")
            and path.exists()
            and hmac.compare_digest(file_sha256(path), sig["exported_sha256"])
        ):
            return
        raise TrajscopeError(
            f"{self.run_path} holds an exported program ({path.name}) that is not signed by you, and "
            f"loading it can execute code: pass --trust (trust=True) if you trust where the run came "
            f"from, or --model package.module:factory"
        )

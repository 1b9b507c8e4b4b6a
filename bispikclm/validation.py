"""Checks of user input made before anything runs or is written: values against their declared types (recipe
sections, configs), text files, and checkpoints loaded with ``from_pretrained``. Each failure is a one-line
:class:`~bispikclm.errors.UserError` that names the file, field or value at fault."""

from __future__ import annotations

import math
from pathlib import Path

from .errors import UserError

STUDENT_MODEL_TYPE = "bispikclm"


def _is_type(value, name: str) -> bool:
    """Whether ``value`` is of the simple annotation ``name`` (``int``, ``float``, ``str``, ``bool``, ``dict``,
    ``None``, ``list[int]``, ``tuple[float, float]``); numbers must be finite, and booleans are not numbers."""
    number = isinstance(value, (int, float)) and not isinstance(value, bool)
    if name == "None":
        return value is None
    if name == "int":
        return number and isinstance(value, int)
    if name == "float":
        return number and math.isfinite(value)
    if name in ("str", "bool", "dict"):
        return isinstance(value, {"str": str, "bool": bool, "dict": dict}[name])
    if name.startswith(("list[", "tuple[")):
        items = [i.strip() for i in name[name.index("[") + 1:-1].split(",")]
        if not isinstance(value, (list, tuple)) or (name.startswith("tuple") and len(value) != len(items)):
            return False
        return all(_is_type(v, items[0 if name.startswith("list") else i]) for i, v in enumerate(value))
    raise TypeError(f"no check for the annotation {name!r}")


def check_types(where: str, values: dict, annotations: dict[str, str], extra: tuple[str, ...] = ()) -> None:
    """UserError unless every key of ``values`` is declared in ``annotations`` (or in ``extra``, checked by the
    caller) and its value has the declared type (string annotations such as ``"int | None"``)."""
    if not isinstance(values, dict):
        raise UserError(f"{where} must be a mapping of settings, got {type(values).__name__} {values!r}")
    unknown = sorted(set(values) - set(annotations) - set(extra))
    if unknown:
        raise UserError(f"{where} has unknown settings {unknown} (known: {sorted([*annotations, *extra])})")
    for key, value in values.items():
        if key in annotations and not any(_is_type(value, t.strip()) for t in annotations[key].split("|")):
            raise UserError(f"{where}.{key} must be {annotations[key]}, got {type(value).__name__} {value!r}")


def need(condition: bool, where: str, what: str, value) -> None:
    """UserError ``"{where} {what}, got {value!r}"`` unless ``condition``."""
    if not condition:
        raise UserError(f"{where} {what}, got {value!r}")


def check_text_file(path: str | Path, what: str = "text file") -> Path:
    """``path`` if it is a readable, non-empty UTF-8 text file; else a UserError ``cannot read {what} {path}:
    {reason}`` (not found, a folder, binary, not UTF-8, no text). Reads the file once, in blocks."""
    path = Path(path)

    def fail(reason: str):
        raise UserError(f"cannot read {what} {path}: {reason}")

    if not path.is_file():
        fail("it is a folder" if path.is_dir() else "no such file")
    any_text = False
    try:
        with path.open(encoding="utf-8") as handle:
            while block := handle.read(1 << 20):
                if "\x00" in block:
                    fail("it is binary (it holds NUL bytes), not text")
                any_text = any_text or bool(block.strip())
    except UnicodeDecodeError as err:
        fail(f"it is not UTF-8 text (byte {err.start} of a block: {err.reason})")
    except OSError as err:
        fail(str(err.strerror))
    if not any_text:
        fail("it holds no text")
    return path


def load_pretrained(load, path: str | Path, weights: bool = False, **kwargs):
    """``load(path, **kwargs)`` (a ``from_pretrained``), with a damaged or mismatched checkpoint (truncated or
    corrupt safetensors, a bad config.json) turned into a UserError naming ``path``. ``weights``: ``load``
    builds a model, which must find every one of its weights in the checkpoint, each of its shape (transformers
    would start missing ones from random values)."""
    from safetensors import SafetensorError
    from transformers.utils import logging

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
    import torch

    bad = next((name for name, p in model.state_dict().items()
                if p.is_floating_point() and not bool(torch.isfinite(p).all())), None)
    if bad is not None:
        raise UserError(f"checkpoint {path} holds NaN or infinite weights ({bad}); it is corrupt or diverged")


def check_student_config(config, path: str | Path) -> None:
    """UserError unless ``config`` (a loaded config) is a BiSpikCLM student's."""
    model_type = getattr(config, "model_type", None)
    if model_type != STUDENT_MODEL_TYPE:
        raise UserError(f"{path} holds a {model_type!r} model, not a BiSpikCLM student")


def check_vocabulary(model, tokenizer, path: str | Path) -> None:
    """UserError when ``tokenizer`` gives ids beyond the rows of the model's embedding (a tokenizer of another
    model)."""
    rows = model.get_input_embeddings().num_embeddings
    if len(tokenizer) > rows:
        raise UserError(f"vocabulary mismatch in {path}: the tokenizer has {len(tokenizer)} tokens, the model's "
                        f"embedding {rows}; use the tokenizer the model was trained with")


def check_train_settings(values: dict, annotations: dict[str, str], where: str = "train") -> None:
    """UserError unless ``values`` (a recipe's ``train`` section, see :class:`bispikclm.distill.TrainConfig`
    and its ``annotations``) has known keys, values of the declared types, and values in range."""
    from .distill.losses import DEFAULT_WEIGHTS, RATE_TARGETS

    check_types(where, values, annotations)
    at_least = {"tokens": 1, "seq_len": 1, "batch_size": 1, "micro_batch_size": 1, "vocab_chunk_size": 1,
                "log_every": 1, "keep_checkpoints": 1, "max_bad_steps": 1, "eval_every": 0, "eval_batches": 0,
                "save_every": 0, "weight_decay": 0, "clip": 0, "spike_cost": 0}
    for key, low in at_least.items():
        if values.get(key) is not None:
            need(values[key] >= low, f"{where}.{key}", f"must be >= {low}", values[key])
    for key in ("lr", "tau"):
        if key in values:
            need(values[key] > 0, f"{where}.{key}", "must be > 0", values[key])
    if "warmup_ratio" in values:
        need(0 <= values["warmup_ratio"] <= 1, f"{where}.warmup_ratio", "must be in [0, 1]", values["warmup_ratio"])
    if "betas" in values:
        need(all(0 <= b < 1 for b in values["betas"]), f"{where}.betas", "must be two numbers in [0, 1)",
             values["betas"])
    choices = {"mixed_precision": ("auto", "no", "bf16", "fp16"), "rate_targets": RATE_TARGETS}
    for key, known in choices.items():
        if key in values:
            need(values[key] in known, f"{where}.{key}", f"must be one of {known}", values[key])
    weights = values.get("weights", {})
    check_types(f"{where}.weights", weights, {name: "float" for name in DEFAULT_WEIGHTS})
    need(all(w >= 0 for w in weights.values()) and any(w > 0 for w in {**DEFAULT_WEIGHTS, **weights}.values()),
         f"{where}.weights", "must be >= 0 with at least one > 0", weights)

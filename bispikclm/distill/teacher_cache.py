"""Run the teacher once per training sequence and keep what the SpAD losses need, so that students distilled from a
slow teacher (a 135M Llama forwards about 560 tokens/s on 2 CPU cores) do not pay for it at every step, and so that
several students (the spiking one and its same-shape ANN) share one teacher pass.

What is kept, for each sequence of the training token file, as memory-mapped ``.npy`` arrays in one folder:

* ``topk_values``/``topk_indices`` ``[n, N, k]``: the teacher's ``k`` largest logits per position (float16/int32);
  L_soft is then the KL divergence of the teacher's distribution restricted to those ``k`` tokens
  (:func:`bispikclm.distill.losses.topk_kl`);
* ``hidden`` ``[n, len(hidden_layers), N, D]``: the teacher hidden states L_emb and L_feat compare with (float16);
* ``attentions`` ``[n, len(attention_layers), H, N, N]``: the aligned layers' softmax maps (float16), averaged over
  heads when the student's head count differs (the only form the attention loss then uses).

``meta.json`` records the layout, the teacher and a digest of the sequences; ``done`` (sequences written so far) is
updated after each flushed batch (arrays synced first, then ``meta.json`` replaced atomically), so a killed build
resumes where it stopped. A complete cache has a ``manifest.json`` (sizes and sha256 of every file,
:mod:`bispikclm.runfolder`) and is verified before it is used; a damaged one is built again. The build holds the
folder's lock (one builder at a time), allocates the arrays' disk space up front (a full disk is a one-line error,
not a crash in the middle), and stops after the batch in progress on SIGTERM or SIGINT. A cache built for other
sequences, a different teacher or another layout is refused.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from .. import runfolder
from ..errors import UserError
from .losses import SpADLoss, TopKLogits
from .teacher import TeacherOutput, teacher_forward


@dataclass
class CacheSpec:
    """Which teacher outputs to keep: hidden-state indices (0 = embedding output), attention layers (1-based, as
    :func:`bispikclm.distill.losses.layer_map` numbers them), whether maps are averaged over heads, and ``top_k``."""

    hidden_layers: list[int]
    attention_layers: list[int]
    average_heads: bool
    top_k: int = 64

    @classmethod
    def for_loss(cls, spad: SpADLoss, student_config, teacher_config, top_k: int = 64) -> "CacheSpec":
        """Exactly what ``spad``'s active terms read from the teacher."""
        hidden: set[int] = set()
        if "emb" in spad.active:
            hidden.add(0)
        if "feat" in spad.active:
            hidden.update(spad.map)
            hidden.update([0] + spad.map[:-1])
        attention = list(spad.map) if "attn" in spad.active else []
        average = student_config.num_attention_heads != teacher_config.num_attention_heads
        return cls(sorted(hidden), attention, average, top_k)


def sequences_digest(sequences) -> str:
    """A short digest of the token ids of ``sequences`` ``[n, N]`` (a tensor or a memory-mapped token file)."""
    h = hashlib.sha256()
    for i in range(0, len(sequences), 1024):
        h.update(np.ascontiguousarray(np.asarray(sequences[i:i + 1024], dtype=np.int64)).tobytes())
    return h.hexdigest()[:16]


class TeacherCache:
    """A built cache in ``folder`` (see the module docstring); :meth:`outputs` gives a :class:`TeacherOutput` for
    sequence indices, in the layout the SpAD losses read."""

    def __init__(self, folder: str | Path, verify: bool = True) -> None:
        self.folder = Path(folder)
        self.meta = _read_meta(self.folder)
        if self.meta is None:
            raise UserError(f"{self.folder} holds no teacher cache (no meta.json)")
        if self.meta["done"] < self.meta["sequences"]:
            raise UserError(f"the teacher cache in {self.folder} is incomplete ({self.meta['done']} of "
                            f"{self.meta['sequences']} sequences); build it again to resume")
        reason = runfolder.check_manifest(self.folder) if verify else None
        if reason:
            raise UserError(f"the teacher cache in {self.folder} is damaged ({reason}); build it again")
        self.spec = CacheSpec(**self.meta["spec"])
        self.arrays = {name: np.load(self.folder / f"{name}.npy", mmap_mode="r") for name in self._names(self.spec)}

    @staticmethod
    def _names(spec: CacheSpec) -> list[str]:
        return (["topk_values", "topk_indices"] + (["hidden"] if spec.hidden_layers else [])
                + (["attentions"] if spec.attention_layers else []))

    @classmethod
    @torch.no_grad()
    def build(cls, teacher, sequences, folder: str | Path, spec: CacheSpec, teacher_name: str,
              batch_size: int = 8, progress: bool = True) -> "TeacherCache":
        """Run ``teacher`` over every sequence of ``sequences`` ``[n, N]`` and write the cache to ``folder``
        (resuming a partial build of the same sequences, teacher and spec; a complete, verified cache is used as it
        is). Raises :class:`bispikclm.runfolder.Interrupted` when SIGTERM or SIGINT stopped it between batches."""
        folder = Path(folder)
        n, seq_len = len(sequences), int(sequences.shape[1])
        cfg = teacher.config
        heads = 1 if spec.average_heads else cfg.num_attention_heads
        shapes = {"topk_values": ((n, seq_len, spec.top_k), np.float16),
                  "topk_indices": ((n, seq_len, spec.top_k), np.int32),
                  "hidden": ((n, len(spec.hidden_layers), seq_len, cfg.hidden_size), np.float16),
                  "attentions": ((n, len(spec.attention_layers), heads, seq_len, seq_len), np.float16)}
        identity = {"sequences": n, "seq_len": seq_len, "digest": sequences_digest(sequences),
                    "teacher": teacher_name, "spec": asdict(spec)}
        if cls._done(folder, identity) == n and runfolder.check_manifest(folder) is None:
            return cls(folder, verify=False)        # complete and verified: no writer needed
        with runfolder.RunLock(folder, "teacher cache build"), \
                runfolder.StopSignals("stopping after the batch in progress") as stop:
            done = cls._done(folder, identity)
            if done == n and (reason := runfolder.check_manifest(folder)):
                runfolder.warn(f"the teacher cache in {folder} is damaged or unverified ({reason}); building it again")
                done = 0
            done = max(done, 0)
            with runfolder.writing(f"the teacher cache {folder}"):
                arrays = cls._open_arrays(folder, shapes, spec, done)
                cls._fill(teacher, sequences, arrays, spec, folder, identity, done, batch_size, progress, stop)
                runfolder.write_manifest(folder)
        return cls(folder, verify=False)

    @staticmethod
    def _done(folder: Path, identity: dict) -> int:
        """Sequences a build of ``identity`` has written to ``folder`` (-1: no build started); UserError if
        ``folder`` holds another cache or an unreadable ``meta.json``."""
        if not (folder / "meta.json").exists():
            return -1
        meta = _read_meta(folder)
        if meta is None or {k: meta.get(k) for k in identity} != identity:
            raise UserError(f"{folder} holds a teacher cache of other sequences, another teacher or another layout, "
                            f"or an unreadable meta.json; use another folder")
        return int(meta["done"])

    @classmethod
    def _open_arrays(cls, folder: Path, shapes: dict, spec: CacheSpec, done: int) -> dict[str, np.memmap]:
        """The cache's memory-mapped arrays, their disk space allocated up front: a full disk is an ``OSError``
        here rather than a SIGBUS when a page of the map is first written."""
        names = cls._names(spec)
        arrays = {}
        try:
            for name in names:
                shape, dtype = shapes[name]
                path = folder / f"{name}.npy"
                mode = "r+" if done and path.is_file() else "w+"
                arrays[name] = np.lib.format.open_memmap(path, mode=mode, dtype=dtype, shape=shape)
                with open(path, "r+b") as f:
                    os.posix_fallocate(f.fileno(), 0, os.fstat(f.fileno()).st_size)
        except OSError as err:
            arrays.clear()                  # unmapped: nothing keeps the file system busy
            if not done:                    # a fresh build leaves nothing behind
                for name in names:
                    (folder / f"{name}.npy").unlink(missing_ok=True)
            needed = sum(np.prod(shapes[name][0]) * np.dtype(shapes[name][1]).itemsize for name in names)
            raise OSError(err.errno, f"{err.strerror} (the cache needs {needed / 2**30:.2f} GiB)") from None
        return arrays

    @staticmethod
    def _fill(teacher, sequences, arrays: dict, spec: CacheSpec, folder: Path, identity: dict, done: int,
              batch_size: int, progress: bool, stop: runfolder.StopSignals) -> None:
        n = len(sequences)
        meta_path = folder / "meta.json"
        device = next(teacher.parameters()).device
        bar = tqdm(total=n, initial=done, unit="seq", desc="teacher cache", disable=not progress)
        for first in range(done, n, batch_size):
            ids = torch.as_tensor(np.asarray(sequences[first:first + batch_size]), dtype=torch.long, device=device)
            out = teacher_forward(teacher, ids)
            values, indices = out.logits.float().topk(spec.top_k, dim=-1)
            last = first + len(ids)
            arrays["topk_values"][first:last] = values.cpu().numpy().astype(np.float16)
            arrays["topk_indices"][first:last] = indices.cpu().numpy().astype(np.int32)
            if spec.hidden_layers:
                hidden = torch.stack([out.hidden_states[j] for j in spec.hidden_layers], 1)
                arrays["hidden"][first:last] = hidden.float().cpu().numpy().astype(np.float16)
            if spec.attention_layers:
                maps = torch.stack([out.attentions[j - 1] for j in spec.attention_layers], 1)
                if spec.average_heads:
                    maps = maps.float().mean(2, keepdim=True)
                arrays["attentions"][first:last] = maps.float().cpu().numpy().astype(np.float16)
            for array in arrays.values():
                array.flush()               # msync: the rows are on disk before meta.json counts them
            _write_json(meta_path, {**identity, "done": last})
            bar.update(len(ids))
            if stop.received:
                bar.close()
                raise runfolder.Interrupted(stop.received, f"stopped by {runfolder.signal_name(stop.received)} "
                                                           f"while building the teacher cache {folder} ({last} of "
                                                           f"{n} sequences done)")
        bar.close()
        if not meta_path.is_file():       # an empty sequence set
            _write_json(meta_path, {**identity, "done": 0})

    def check(self, sequences, spec: CacheSpec) -> None:
        """Raise :class:`UserError` unless this cache was built for ``sequences`` with ``spec``."""
        if self.meta["sequences"] != len(sequences) or self.meta["digest"] != sequences_digest(sequences):
            raise UserError(f"the teacher cache in {self.folder} was built for other training sequences")
        if asdict(spec) != self.meta["spec"]:
            raise UserError(f"the teacher cache in {self.folder} keeps {self.meta['spec']}, the losses need "
                            f"{asdict(spec)}")

    def outputs(self, indices: list[int], device: torch.device | str = "cpu") -> TeacherOutput:
        """The cached teacher outputs of sequences ``indices``: ``logits`` as :class:`TopKLogits`, and hidden states
        and attention maps at the kept positions of full-length tuples (``None`` elsewhere)."""
        idx = np.asarray(indices)

        def take(name: str) -> torch.Tensor:
            return torch.from_numpy(np.ascontiguousarray(self.arrays[name][idx])).to(device)

        logits = TopKLogits(take("topk_values").float(), take("topk_indices").long())
        spec = self.spec
        hidden: list[torch.Tensor | None] = [None] * (max(spec.hidden_layers, default=0) + 1)
        if spec.hidden_layers:
            states = take("hidden").float()
            for k, j in enumerate(spec.hidden_layers):
                hidden[j] = states[:, k]
        attentions: list[torch.Tensor | None] = [None] * max(spec.attention_layers, default=0)
        if spec.attention_layers:
            maps = take("attentions").float()
            for k, j in enumerate(spec.attention_layers):
                attentions[j - 1] = maps[:, k]
        return TeacherOutput(logits, tuple(hidden), tuple(attentions))


def _write_json(path: Path, value: dict) -> None:
    runfolder.write_file(path, json.dumps(value, indent=1))


def _read_meta(folder: Path) -> dict | None:
    """``meta.json`` of a cache folder; ``None`` if there is none; UserError if it is unreadable."""
    try:
        meta = json.loads((folder / "meta.json").read_text())
        int(meta["done"]), int(meta["sequences"]), meta["spec"]
    except FileNotFoundError:
        return None
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise UserError(f"the teacher cache in {folder} has an unreadable meta.json ({type(err).__name__}); use "
                        f"another folder or delete it") from None
    return meta

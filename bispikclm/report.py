"""Pictures of what a student does, and a self-contained HTML report of a run folder.

* the firing-pattern figure: rows = blocks, columns = time steps, each panel the block-input spikes SN(X_l)[t]
  as tokens x neurons;
* firing rate per block and neuron group (a heat map);
* student against teacher attention maps: mean_t P of SFSA beside the teacher's softmax probabilities,
  averaged over heads (blocks paired as distillation pairs them, ``distill.losses.layer_map``);
* energy per token by part, student against the ANN (:mod:`bispikclm.energy`), and the audit
  (:mod:`bispikclm.audit`).
"""

from __future__ import annotations

import base64
import html
import json
import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.colors import PowerNorm  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402

from .audit import audit, format_audit  # noqa: E402
from .configuration import NEURON_GROUPS  # noqa: E402
from .distill.losses import layer_map  # noqa: E402
from .ann import same_shape_ann  # noqa: E402
from .checkpoints import check_vocabulary, load_pretrained  # noqa: E402
from .configuration import max_positions  # noqa: E402
from .cost_tables import PARTS  # noqa: E402
from .data import text_token_ids  # noqa: E402
from .energy import count_operations, energy_report, format_report, save_report  # noqa: E402
from .errors import UserError  # noqa: E402


@torch.no_grad()
def block_input_spikes(model: nn.Module, input_ids: torch.LongTensor) -> list[torch.Tensor]:
    """Block-input spikes SN(X_l) of the first sequence, one ``[T, N, D]`` bool tensor per block."""
    spikes, handles = [], []
    for block in model.model.layers:
        hook = lambda m, args, out: spikes.append(out[:, 0].bool())  # noqa: E731
        handles.append(block.attn_in_neuron.register_forward_hook(hook))
    try:
        model(input_ids=input_ids, use_cache=False)
    finally:
        for handle in handles:
            handle.remove()
    return spikes


def plot_firing_pattern(spikes: list[torch.Tensor], path: str | Path, max_neurons: int = 128) -> None:
    """Rows = blocks, columns = time steps; each panel tokens (vertical) x the first ``max_neurons`` neurons."""
    layers, steps = len(spikes), spikes[0].shape[0]
    fig, axes = plt.subplots(layers, steps, figsize=(2.6 * steps + 1, 1.5 * layers + 0.8), squeeze=False,
                             sharex=True, sharey=True, layout="constrained")
    for l, layer_spikes in enumerate(spikes):
        for t in range(steps):
            panel = layer_spikes[t, :, :max_neurons].float().numpy()
            ax = axes[l, t]
            ax.imshow(panel, cmap="Greys", vmin=0, vmax=1, aspect="auto", interpolation="nearest")
            ax.set_xticks([]), ax.set_yticks([])
            if l == 0:
                ax.set_title(f"t = {t + 1}", fontsize=10)
            if t == 0:
                ax.set_ylabel(f"block {l}\nrate {layer_spikes.float().mean():.2f}\ntokens", fontsize=8)
            if l == layers - 1:
                ax.set_xlabel("neurons", fontsize=8)
    shown = min(max_neurons, spikes[0].shape[-1])
    fig.suptitle(f"Block-input spikes SN(X_l)[t]: tokens (down) x first {shown} neurons (across)", fontsize=10)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_firing_rates(by_layer: dict[str, dict[str, float]], path: str | Path) -> None:
    """Heat map of firing rate per block (rows) and neuron group (columns), values written in the cells."""
    rows = sorted((k for k in by_layer if k != "head"), key=int) + (["head"] if "head" in by_layer else [])
    groups = [g for g in NEURON_GROUPS if any(g in by_layer[r] for r in rows)]
    values = torch.tensor([[by_layer[r].get(g, float("nan")) for g in groups] for r in rows])
    fig, ax = plt.subplots(figsize=(0.85 * len(groups) + 2, 0.35 * len(rows) + 1.5), layout="constrained")
    image = ax.imshow(values.numpy(), cmap="viridis", vmin=0, vmax=max(0.5, float(values.nan_to_num().max())),
                      aspect="auto")
    for i in range(len(rows)):
        for j in range(len(groups)):
            if not torch.isnan(values[i, j]):
                ax.text(j, i, f"{values[i, j]:.2f}", ha="center", va="center", fontsize=7,
                        color="white" if values[i, j] < 0.35 else "black")
    ax.set_xticks(range(len(groups)), groups, rotation=40, ha="right", fontsize=8)
    ax.set_yticks(range(len(rows)), [r if r == "head" else f"block {r}" for r in rows], fontsize=8)
    fig.colorbar(image, ax=ax, label="firing rate")
    ax.set_title("Firing rate per block and neuron group", fontsize=10)
    fig.savefig(path, dpi=110)
    plt.close(fig)


@torch.no_grad()
def attention_maps(student: nn.Module, teacher: nn.Module | None, input_ids: torch.LongTensor):
    """Head-averaged maps of the first sequence: student mean_t P per block ``[N, N]``, and the teacher's
    softmax probabilities of the block distillation aligned it with (:func:`~bispikclm.distill.losses.layer_map`;
    ``None`` without a teacher)."""
    maps = [a[0].float().mean(0) for a in student(input_ids=input_ids, use_cache=False,
                                                   output_attentions=True).attentions]
    if teacher is None:
        return maps, None
    teacher.set_attn_implementation("eager")
    teacher_maps = teacher(input_ids=input_ids, use_cache=False, output_attentions=True).attentions
    mapped = [teacher_maps[layer - 1][0].float().mean(0) for layer in layer_map(len(maps), len(teacher_maps))]
    return maps, mapped


def plot_attention(student_maps: list[torch.Tensor], teacher_maps: list[torch.Tensor] | None,
                   path: str | Path, blocks_per_row: int = 4) -> None:
    """Per block, the student's map and beside it the teacher's (when given); ``blocks_per_row`` blocks a row."""
    per_block = 1 if teacher_maps is None else 2
    across = min(blocks_per_row, len(student_maps))
    rows = math.ceil(len(student_maps) / across)
    fig, axes = plt.subplots(rows, across * per_block, figsize=(2.2 * across * per_block + 1, 2.3 * rows + 0.6),
                             squeeze=False, layout="constrained")
    for ax in axes.flat:
        ax.set_axis_off()
    for l, student_map in enumerate(student_maps):
        panels = [("student", student_map)] + ([("teacher", teacher_maps[l])] if teacher_maps is not None else [])
        for c, (who, panel) in enumerate(panels):
            ax = axes[l // across, (l % across) * per_block + c]
            image = ax.imshow(panel.numpy(), cmap="magma", norm=PowerNorm(0.5, vmin=0, vmax=1),
                              interpolation="nearest")
            ax.set_title(f"block {l}: {who}", fontsize=8)
    fig.colorbar(image, ax=axes, shrink=0.6, label="attention (sqrt scale)")
    fig.suptitle("Attention maps averaged over heads, queries down, keys across\nstudent: mean_t P"
                 + ("" if teacher_maps is None else "; teacher: softmax probabilities"), fontsize=9)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_energy(report: dict, path: str | Path) -> None:
    """Stacked bars: energy per token by part, student against the ANN."""
    fig, ax = plt.subplots(figsize=(5, 3.6), layout="constrained")
    for x, who in enumerate(("student", "ann")):
        bottom = 0.0
        for i, part in enumerate(PARTS):
            value = report[who]["parts"].get(part, {}).get("mj_per_token", 0.0)
            ax.bar(x, value, bottom=bottom, color=plt.cm.tab10(i), label=part if x == 0 else None)
            bottom += value
    ax.set_xticks([0, 1], [f"student (T = {report['time_steps']})", "ANN"])
    ax.set_ylabel("energy per token (mJ)")
    ax.set_title(f"student / ANN = {100 * report['ratio']:.2f}%", fontsize=10)
    ax.legend(fontsize=8)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _image(path: Path) -> str:
    data = base64.b64encode(path.read_bytes()).decode()
    return f'<img alt="{path.stem}" src="data:image/png;base64,{data}">'


def model_dir(folder: Path) -> Path | None:
    """``folder`` when it holds a saved model, else ``folder/model`` (a training run's layout), else ``None``."""
    for candidate in (folder, folder / "model"):
        if (candidate / "config.json").is_file():
            return candidate
    return None


def report_models(spec: str | Path, teacher: str | Path | None = None) -> tuple[str, str | None]:
    """``(student, teacher)`` model sources of a report: ``spec`` is a run folder holding ``student/`` and optionally
    ``teacher/`` (``save_pretrained`` folders, or training run folders with them in ``model/``), or the student
    itself (a folder, a ``.gguf`` file, a short name or a Hub name). ``teacher``, when given, replaces the run
    folder's."""
    folder = Path(spec)
    if (folder / "student").is_dir():
        student = model_dir(folder / "student")
        if student is None:
            raise UserError(f"{folder} has no student/ (or student/model/) folder with a saved model")
        if teacher is None:
            teacher = model_dir(folder / "teacher")
    else:
        student = (model_dir(folder) if folder.is_dir() else None) or spec
    return str(student), None if teacher is None else str(teacher)


def build_report(run_dir: str | Path, out_dir: str | Path | None = None, text: str | Path | None = None,
                 tokens: int = 32, energy_seq_len: int = 256, teacher: str | Path | None = None) -> Path:
    """Pictures, ``energy.json``, ``audit.json`` and ``report.html`` (images embedded) of a student against its
    teacher (see :func:`report_models` for what ``run_dir`` and ``teacher`` may be; without a teacher, against a
    same-shape OPT), in ``out_dir`` (default ``run_dir/report`` when ``run_dir`` is a folder). Returns the path of
    the HTML file."""
    student_spec, teacher_spec = report_models(run_dir, teacher)
    if out_dir is None and not Path(run_dir).is_dir():
        raise UserError(f"name the report's folder with --out ({str(run_dir)!r} is not a folder to write it in)")
    run_dir = Path(run_dir)
    out = Path(out_dir) if out_dir is not None else run_dir / "report"
    student, tokenizer = load_pretrained(student_spec)
    if not hasattr(student.config, "time_steps"):
        raise UserError(f"{student_spec} is not a BiSpikCLM student")
    teacher = load_pretrained(teacher_spec)[0] if teacher_spec is not None else None
    positions = max_positions(student)
    short = text_token_ids(tokenizer, text, tokens, max_length=positions)
    long = text_token_ids(tokenizer, text, min(energy_seq_len, positions))
    if teacher is not None:
        check_vocabulary(teacher, len(tokenizer), "teacher")
    out.mkdir(parents=True, exist_ok=True)

    plot_firing_pattern(block_input_spikes(student, short), out / "firing_pattern.png")
    energy = energy_report(count_operations(student, long, name="student"),
                           count_operations(teacher or same_shape_ann(student.config), long,
                                            name="teacher" if teacher is not None else "same-shape OPT"))
    plot_firing_rates(energy["firing_rates"]["by_layer"], out / "firing_rates.png")
    plot_attention(*attention_maps(student, teacher, short), out / "attention.png")
    plot_energy(energy, out / "energy.png")
    audit_result = audit(student, short, name="student")
    save_report(energy, out / "energy.json")
    (out / "audit.json").write_text(json.dumps(audit_result.to_dict(), indent=1) + "\n")

    words = html.escape(tokenizer.decode(short[0]))
    ann_name = "the teacher" if teacher is not None else "a same-shape OPT (no teacher in the run folder)"
    page = f"""<!doctype html>
<html><head><meta charset="utf-8"><title>BiSpikCLM report: {html.escape(run_dir.name)}</title>
<style>body{{font-family:sans-serif;max-width:1100px;margin:2em auto}}img{{max-width:100%}}
pre{{background:#f4f4f4;padding:1em;overflow-x:auto}}</style></head><body>
<h1>BiSpikCLM report: {html.escape(str(run_dir))}</h1>
<p>Student: T = {student.config.time_steps}, {student.config.num_hidden_layers} blocks, width
{student.config.hidden_size}, spiking head: {student.config.spiking_head}. Pictures use the first {tokens} tokens
of the text: <i>{words}</i></p>
<h2>Energy against {ann_name}</h2>
<p>Counted on {energy_seq_len} tokens of the text; every line is defined in the documentation of
<code>bispikclm.energy</code>.</p>
<pre>{html.escape(format_report(energy))}</pre>{_image(out / "energy.png")}
<h2>Firing pattern</h2>{_image(out / "firing_pattern.png")}
<h2>Firing rates</h2>{_image(out / "firing_rates.png")}
<h2>Attention maps</h2>{_image(out / "attention.png")}
<h2>MatMul-free audit</h2><pre>{html.escape(format_audit(audit_result))}</pre>
</body></html>
"""
    (out / "report.html").write_text(page)
    return out / "report.html"

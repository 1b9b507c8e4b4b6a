"""The trainer end to end through ``bispikclm train``: resume after kill -9, two processes against one, bad input,
and NaN/Inf steps. Every run distills a same-shape student from a small OPT teacher on real WikiText-2 text."""

from __future__ import annotations

import json
import signal
import subprocess
import time

import pytest
import torch
from safetensors.torch import load_file

from bispikclm.cli import main
from bispikclm.errors import UserError
from bispikclm.runfolder import load_state
from helpers import cli, cli_command, make_teacher, make_tokenizer, write_recipe

STEPS = 40


@pytest.fixture(scope="module")
def setup(data_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("distill")
    tokenizer = make_tokenizer(data_dir, root / "tok")
    teacher = make_teacher("opt", root / "opt", tokenizer)
    return root, teacher, data_dir


@pytest.fixture(scope="module")
def llama_teacher(setup):
    root, _, _ = setup
    from transformers import AutoTokenizer

    return make_teacher("llama-gqa", root / "llama", AutoTokenizer.from_pretrained(str(root / "tok")))


def losses(run) -> dict[int, float]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in rows if "loss" in r}


def weights(run) -> dict[str, torch.Tensor]:
    return load_file(str(run / "model" / "model.safetensors"))


@pytest.mark.parametrize("arch", ["opt", "llama-gqa"])
def test_resume_after_kill_9_gives_the_same_loss_sequence(setup, llama_teacher, arch):
    """OPT teacher: OPT-style student; Llama teacher with grouped-query attention and tied embeddings: a
    grouped-query, gated-FFN student with a learned position table sized to the training context."""
    root, teacher, data_dir = setup
    root = root / f"resume-{arch}"
    root.mkdir()
    teacher = llama_teacher if arch == "llama-gqa" else teacher
    recipe = write_recipe(root / "resume.yaml", teacher, data_dir, tokens=4 * 32 * STEPS, save_every=4)
    done = cli("train", str(recipe), "--out", str(root / "whole"))
    assert done.returncode == 0, done.stderr
    config = json.loads((root / "whole" / "model" / "config.json").read_text())
    if arch == "llama-gqa":
        assert (config["ffn_type"], config["num_key_value_heads"], config["max_position_embeddings"]) == ("gated", 2, 32)
        assert config["tie_word_embeddings"] and "lm_head.weight" not in weights(root / "whole")

    killed = root / "killed"
    argv, env = cli_command("train", str(recipe), "--out", str(killed))
    proc = subprocess.Popen(argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    latest = killed / "checkpoints" / "latest"
    while proc.poll() is None and not (latest.is_file() and latest.read_text() >= "step-00000008"):
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL, "the run ended before it could be killed"
    assert max(losses(killed)) < STEPS

    resumed = cli("train", str(recipe), "--out", str(killed), "--resume")
    assert resumed.returncode == 0, resumed.stderr
    # the killed run's lock is taken over, with a warning naming it
    assert f"taking over the lock of {killed} from PID {proc.pid} (train" in resumed.stderr
    expected, got = losses(root / "whole"), losses(killed)
    assert list(got) == list(range(1, STEPS + 1)) and got == expected
    assert all(torch.equal(weights(root / "whole")[k], v) for k, v in weights(killed).items())


def test_two_processes_match_one_with_the_same_global_batch(setup):
    root, teacher, data_dir = setup
    # a student narrower than the teacher, so that the SpAD projectors (outside the wrapped model) train too
    recipe = write_recipe(root / "ddp.yaml", teacher, data_dir, tokens=4 * 32 * 6)
    narrow = ("--set", "student.hidden_size=16")
    one = cli("train", str(recipe), "--out", str(root / "one"), *narrow)
    assert one.returncode == 0, one.stderr
    two = cli("train", str(recipe), "--out", str(root / "two"), *narrow,
              launcher=("-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29517"))
    assert two.returncode == 0, two.stderr
    assert json.loads((root / "two" / "final.json").read_text())["processes"] == 2
    a, b = losses(root / "one"), losses(root / "two")
    assert list(a) == list(b) == list(range(1, 7))
    assert all(abs(a[k] - b[k]) <= 1e-4 * abs(a[k]) for k in a), (a, b)
    wa, wb = weights(root / "one"), weights(root / "two")
    assert all(torch.allclose(wa[k], wb[k], rtol=1e-3, atol=1e-5) for k in wa)
    pa, pb = (load_state(root / run / "checkpoints" / "step-00000006" / "state.safetensors")["spad"]
              for run in ("one", "two"))
    assert pa and all(torch.allclose(pa[k], pb[k], atol=1e-6) for k in pa)


@pytest.mark.parametrize("arch", ["opt", "llama-gqa"])
def test_ann_student_of_the_same_shape_distills_with_the_same_losses(setup, llama_teacher, tmp_path, arch):
    """`student.kind: ann`: the ANN of the spiking student's exact shape (OPT or Llama), trained by the same
    trainer on the same data and SpAD terms (without their Rate-MSE parts)."""
    from transformers import AutoModelForCausalLM

    root, teacher, data_dir = setup
    teacher = llama_teacher if arch == "llama-gqa" else teacher
    recipe = write_recipe(tmp_path / "r.yaml", teacher, data_dir, tokens=4 * 32 * 10)
    assert main(["train", str(recipe), "--out", str(tmp_path / "ann"), "--no-progress", "--set",
                 "student.kind=ann", "--set", "student.hidden_size=16"]) == 0
    rows = [json.loads(line) for line in (tmp_path / "ann" / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if "loss" in r]
    assert len(steps) == 10 and {"loss_emb", "loss_attn", "loss_feat", "loss_soft", "loss_hard"} <= set(steps[0])
    assert steps[-1]["loss"] < steps[0]["loss"] and "firing_rate" not in steps[-1]
    ann = AutoModelForCausalLM.from_pretrained(str(tmp_path / "ann" / "model"))
    assert type(ann).__name__ == ("LlamaForCausalLM" if arch == "llama-gqa" else "OPTForCausalLM")
    assert ann.config.hidden_size == 16 and ann.config.num_hidden_layers == 2
    if arch == "llama-gqa":
        assert ann.config.num_key_value_heads == 2 and ann.config.intermediate_size == 64


def error_line(capsys) -> str:
    lines = capsys.readouterr().err.strip().splitlines()
    return lines[-1]


@pytest.mark.parametrize("override, message", [
    ("student.vocab_size=600", "vocabulary mismatch: the student has 600"),
    ("tokenizer=BIG", "vocabulary mismatch: the tokenizer has 1000"),
    ("train.seq_len=65", "beyond the teacher's 64 positions"),
    ("data.train.source=/nonexistent/train.txt", "cannot read text file"),
])
def test_bad_input_is_one_line_and_exit_2(setup, tmp_path, capsys, override, message):
    root, teacher, data_dir = setup
    if override == "tokenizer=BIG":
        make_tokenizer(data_dir, tmp_path / "big", vocab_size=1000)
        override = f"tokenizer={tmp_path / 'big'}"
    recipe = write_recipe(tmp_path / "r.yaml", teacher, data_dir)
    assert main(["train", str(recipe), "--out", str(tmp_path / "run"), "--set", override, "--no-progress"]) == 2
    line = error_line(capsys)
    assert line.startswith("bispikclm train: error:") and message in line


def test_empty_dataset_and_other_configs_checkpoint_are_user_errors(setup, tmp_path, capsys):
    root, teacher, data_dir = setup
    (tmp_path / "empty.txt").write_text("\n \n")
    recipe = write_recipe(tmp_path / "r.yaml", teacher, data_dir, tokens=4 * 32 * 2)
    args = ["train", str(recipe), "--out", str(tmp_path / "run"), "--no-progress"]
    assert main(args + ["--set", f"data.train.source={tmp_path / 'empty.txt'}"]) == 2
    assert "holds no text" in error_line(capsys)
    assert main(args) == 0
    assert main(args + ["--resume", "--set", "train.lr=0.01"]) == 2
    assert "different config" in error_line(capsys)
    assert main(args) == 2
    assert "already holds a run" in error_line(capsys)


def test_nan_steps_are_skipped_then_the_run_stops_with_its_checkpoint_intact(setup, tmp_path, capsys):
    root, teacher, data_dir = setup
    recipe = write_recipe(tmp_path / "r.yaml", teacher, data_dir, lr=1e30, warmup_ratio=0.0, clip=0.0,
                          max_bad_steps=3, save_every=1)
    assert main(["train", str(recipe), "--out", str(tmp_path / "run"), "--no-progress"]) == 2
    assert "NaN/Inf" in error_line(capsys)
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    skipped = [r["step"] for r in rows if r.get("skipped")]
    assert len(skipped) == 3 and skipped == list(range(skipped[0], skipped[0] + 3))
    latest = (tmp_path / "run" / "checkpoints" / "latest").read_text()
    assert int(latest.split("-")[1]) == skipped[-1] - 1
    state = load_file(str(tmp_path / "run" / "checkpoints" / latest / "model.safetensors"))
    assert all(v.isfinite().all() for v in state.values())
    assert not list((tmp_path / "run" / "checkpoints").glob(".tmp*"))


@pytest.mark.parametrize("setting, logged, off", [("spike_cost", "loss_cost", 0.0), ("rate_cost", "loss_rate", 0.0001)])
def test_spike_and_rate_costs_train_towards_fewer_spikes(setup, tmp_path, capsys, setting, logged, off):
    """`train.spike_cost` adds the linear-layer cost estimate to the loss (`loss_cost`, logged for every spiking
    student), `train.rate_cost` the mean firing rate of every neuron (`loss_rate`, logged when on): the same run
    with a large weight ends with a lower logged value than with none (or a negligible one); a negative weight is
    a user error, and so is any weight for an ANN student."""
    root, teacher, data_dir = setup
    recipe = write_recipe(tmp_path / "r.yaml", teacher, data_dir, tokens=4 * 32 * 20)
    last = {}
    for weight in (off, 20.0):
        out = tmp_path / f"{setting}-{weight}"
        assert main(["train", str(recipe), "--out", str(out), "--no-progress", "--set",
                     f"train.{setting}={weight}"]) == 0
        rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        values = [r[logged] for r in rows if logged in r]
        assert len(values) == 20 and all(0 < v < 1 for v in values)
        last[weight] = sum(values[-5:]) / 5
    assert last[20.0] < 0.7 * last[off], last
    assert main(["train", str(recipe), "--out", str(tmp_path / "neg"), "--no-progress", "--set",
                 f"train.{setting}=-1"]) == 2
    assert f"{setting} must be >= 0" in error_line(capsys)
    assert main(["train", str(recipe), "--out", str(tmp_path / "ann"), "--no-progress", "--set",
                 "student.kind=ann", "--set", f"train.{setting}=1"]) == 2
    assert f"{setting} must be >= 0 and needs a spiking student" in error_line(capsys)


def test_early_stopping_keeps_the_best_weights_and_resumes_stopped(setup):
    """A learning rate far too high makes the validation loss worse after the first evaluations: training stops
    after `early_stopping` evaluations without improvement (not before `min_tokens`), the final model is the best
    evaluated one, and a resumed run stays stopped."""
    root, teacher, data_dir = setup
    root = root / "early"
    root.mkdir()
    recipe = write_recipe(root / "early.yaml", teacher, data_dir, tokens=4 * 32 * 60, eval_every=2,
                          early_stopping=2, min_tokens=4 * 32 * 10, lr=0.3, warmup_ratio=0.0, clip=0.0)
    done = cli("train", str(recipe), "--out", str(root / "run"))
    assert done.returncode == 0, done.stderr
    rows = [json.loads(line) for line in (root / "run" / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in rows if "val_loss" in r]
    last_step = max(r["step"] for r in rows if "loss" in r)
    assert last_step < 60 and last_step >= 10, last_step
    best = min(evals, key=lambda r: r["val_loss"])
    assert all(r["val_loss"] >= best["val_loss"] for r in evals[-2:]) and evals[-1]["step"] == last_step
    final = json.loads((root / "run" / "final.json").read_text())
    assert final["stopped_early"] and final["val_loss"] == pytest.approx(best["val_loss"])
    best_weights = load_file(str(root / "run" / "best" / f"step-{best['step']:08d}" / "model.safetensors"))
    final_weights = weights(root / "run")
    common = set(best_weights) & set(final_weights)    # tied weights are stored under one of their names
    assert len(common) >= len(final_weights) - 1
    assert all(torch.equal(best_weights[k], final_weights[k]) for k in common)
    again = cli("train", str(recipe), "--out", str(root / "run"), "--resume")
    assert again.returncode == 0, again.stderr
    assert max(r["step"] for r in (json.loads(x) for x in (root / "run" / "metrics.jsonl").read_text().splitlines())
               if "loss" in r) == last_step


# ---- one optimizer step in process: clipping, weight decay, checkpointing ---------------------------------------
def tiny_trainer(wikitext_word_ids, out, student_options=None, **train):
    """A spiking student of WikiText-2 word ids trained with cross-entropy only (no teacher needed)."""
    from bispikclm import BiSpikCLMConfig, BiSpikCLMForCausalLM
    from bispikclm.data import pack
    from bispikclm.distill import TrainConfig, Trainer

    ids, _, vocab = wikitext_word_ids
    torch.manual_seed(0)
    student = BiSpikCLMForCausalLM(BiSpikCLMConfig(
        vocab_size=vocab, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, ffn_dim=64,
        max_position_embeddings=32, time_steps=2, learn_threshold="channel", learn_beta="group",
        **(student_options or {})))
    config = TrainConfig(**{"tokens": 4 * 32 * 3, "seq_len": 32, "batch_size": 4, "lr": 0.003, "warmup_ratio": 0.0,
                            "weights": {"emb": 0, "attn": 0, "feat": 0, "soft": 0, "hard": 1}, **train})
    return Trainer(student, config, pack(ids[:4096], 32), None, out, progress=False)


def with_loss_scaler(trainer, scale: float, monkeypatch) -> torch.amp.GradScaler:
    """Give ``trainer`` the loss scaling accelerate sets up for fp16 on a GPU (a real GradScaler, on the CPU)."""
    from accelerate import Accelerator
    from accelerate.optimizer import AcceleratedOptimizer

    scaler = torch.amp.GradScaler("cpu", init_scale=scale)
    acc = trainer.accelerator
    acc.scaler, acc.native_amp = scaler, True
    monkeypatch.setattr(Accelerator, "mixed_precision", property(lambda self: "fp16"))
    trainer.optimizer = AcceleratedOptimizer(trainer.optimizer.optimizer, scaler=scaler)
    acc._optimizers = [trainer.optimizer]
    return scaler


def test_clipping_uses_the_unscaled_norm_under_an_fp16_loss_scaler(wikitext_word_ids, tmp_path, monkeypatch):
    """fp16 training scales the loss (and so the gradients) by the loss scale. A real GradScaler on the
    accelerator, as fp16 on a GPU sets it up: the norm and the clipped update must be those of the unscaled
    gradients (a power-of-two scale is exact, so the runs agree bit for bit), not ones a 4096 times larger norm
    clips."""
    plain = tiny_trainer(wikitext_word_ids, tmp_path / "plain", clip=0.1)
    scaled = tiny_trainer(wikitext_word_ids, tmp_path / "scaled", clip=0.1)
    scaler = with_loss_scaler(scaled, 2.0 ** 12, monkeypatch)
    for _ in range(3):
        a, b = plain.train_step(), scaled.train_step()
        assert a["grad_norm"] > 0.1 and not b["skipped"]            # the clip is active
        assert a["grad_norm"] == b["grad_norm"] and a["loss"] == b["loss"]
    assert scaler.get_scale() == 2.0 ** 12                          # every scaled step was taken
    for (name, p), q in zip(plain.model.named_parameters(), scaled.model.parameters()):
        assert torch.equal(p, q), name


def test_a_loss_scale_overflow_is_skipped_and_lowers_the_scale_without_counting_as_divergence(
        wikitext_word_ids, tmp_path, monkeypatch):
    trainer = tiny_trainer(wikitext_word_ids, tmp_path, spike_cost=1000.0)    # gradients up to about 14
    scaler = with_loss_scaler(trainer, 2.0 ** 127, monkeypatch)       # so the scaled ones overflow float32
    before = [p.detach().clone() for p in trainer.model.parameters()]
    metrics = trainer.train_step()
    assert metrics["skipped"] and trainer.skipped == 1 and trainer.bad_steps == 0
    assert scaler.get_scale() == 2.0 ** 126
    assert all(torch.equal(a, b) for a, b in zip(before, trainer.model.parameters()))


def test_clipped_gradients_are_the_gradients_times_clip_over_their_norm(wikitext_word_ids, tmp_path):
    trainer = tiny_trainer(wikitext_word_ids, tmp_path, clip=0.1)
    seen = {}
    trainer.optimizer.optimizer.register_step_pre_hook(
        lambda opt, args, kwargs: seen.update(g={id(p): p.grad.clone() for p in trainer.model.parameters()}))
    raw = {}
    hook = lambda p: raw.__setitem__(id(p), p.grad.clone())         # noqa: E731
    handles = [p.register_post_accumulate_grad_hook(hook) for p in trainer.model.parameters()]
    metrics = trainer.train_step()
    for h in handles:
        h.remove()
    norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in raw.values()]))
    assert metrics["grad_norm"] == pytest.approx(float(norm), rel=1e-6) and float(norm) > 0.1
    for key, g in raw.items():
        torch.testing.assert_close(seen["g"][key], g * (0.1 / (norm + 1e-6)))


def test_weight_decay_spares_biases_norms_gains_thresholds_and_leaks(wikitext_word_ids, tmp_path):
    trainer = tiny_trainer(wikitext_word_ids, tmp_path, weight_decay=0.1)
    decayed, spared = ({id(p) for p in g["params"]} for g in trainer.optimizer.param_groups)
    assert [g["weight_decay"] for g in trainer.optimizer.param_groups] == [0.1, 0.0]
    names = {id(p): n for n, p in trainer.model.named_parameters()}
    assert {names[i] for i in decayed} == {n for n, p in trainer.model.named_parameters() if p.ndim >= 2}
    spared = {names[i] for i in spared}
    for kind in ("fc1.bias", "final_layer_norm.weight", "final_layer_norm.bias", "attn_residual_scale",
                 "q_neuron.threshold_param", "q_neuron.beta_param"):
        assert any(n.endswith(kind) for n in spared), kind
    assert "model.embed_tokens.weight" in {names[i] for i in decayed}


SIGNED_STUDENT = dict(fire="count", beta=1.0, initial_membrane=0.5,
                      neuron_overrides={g: {"signed": True} for g in ("block_in", "q", "k", "v", "attn_out")})


@pytest.mark.parametrize("student_options", [None, SIGNED_STUDENT], ids=["unsigned", "signed"])
def test_gradient_checkpointing_option_gives_the_same_run(wikitext_word_ids, tmp_path, student_options):
    """`train.gradient_checkpointing: true` recomputes each block in backward: same losses, norms and weights,
    and the forward keeps less for the backward (also with signed pairs, whose negative P·V counts the spike
    cost takes |x| of)."""
    runs = [tiny_trainer(wikitext_word_ids, tmp_path / str(on), student_options, gradient_checkpointing=on,
                         spike_cost=0.5 if student_options else 0.0) for on in (False, True)]
    assert [r.model.model.layers[0].gradient_checkpointing for r in runs] == [False, True]
    saved = []
    for run in runs:
        sizes = {}
        pack = lambda t: sizes.__setitem__(t.untyped_storage().data_ptr(), t.untyped_storage().nbytes()) or t  # noqa: E731
        run.model.train()
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            run._forward(run.micro_batch(0, 0), False)
        params = {p.untyped_storage().data_ptr() for p in run.model.parameters()}
        saved.append(sum(n for ptr, n in sizes.items() if ptr not in params))
    assert saved[1] < 0.75 * saved[0], saved         # the vocabulary-sized logits outside the blocks stay
    for _ in range(3):
        a, b = (r.train_step() for r in runs)
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-6)
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-5)
    for p, q in zip(runs[0].model.parameters(), runs[1].model.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)


def test_teacher_dtype_is_pinned(setup, tmp_path, capsys):
    """The teacher runs in float32 whatever its checkpoint says (bfloat16 when asked); other dtypes are refused."""
    from transformers import AutoModelForCausalLM

    from bispikclm.distill import TEACHER_DTYPES, TrainConfig, load_teacher

    root, teacher, data_dir = setup
    half = tmp_path / "bf16-teacher"
    AutoModelForCausalLM.from_pretrained(str(teacher), dtype=torch.bfloat16).save_pretrained(str(half))
    for name, dtype in (("float32", torch.float32), ("bfloat16", torch.bfloat16)):
        config = TrainConfig.from_dict({} if name == "float32" else {"teacher_dtype": name})
        assert load_teacher(str(half), dtype=TEACHER_DTYPES[config.teacher_dtype]).dtype == dtype
    recipe = write_recipe(tmp_path / "r.yaml", teacher, data_dir)
    assert main(["train", str(recipe), "--out", str(tmp_path / "run"), "--no-progress",
                 "--set", "train.teacher_dtype=float16"]) == 2
    assert "train.teacher_dtype must be one of" in error_line(capsys)


def test_shipped_recipes_have_valid_train_sections(monkeypatch):
    from bispikclm.distill import TrainConfig
    from bispikclm.recipes import RECIPES, load_recipe

    names = sorted(p.stem for p in RECIPES.glob("*.yaml"))
    assert {"opt-125m", "opt-1.3b", "smollm2-135m", "quickstart"} <= set(names)
    with pytest.raises(UserError, match="train.fsdp needs torch.distributed: launch with torchrun"):
        TrainConfig.from_dict(load_recipe("opt-1.3b")["train"])     # sharded: refused outside torchrun
    monkeypatch.setenv("WORLD_SIZE", "8")                           # as torchrun --nproc_per_node 8 sets it
    for name in names:
        config = TrainConfig.from_dict(load_recipe(name)["train"])
        assert config.batch_size % (config.micro_batch_size or config.batch_size) == 0, name
    assert TrainConfig.from_dict(load_recipe("opt-1.3b")["train"]).fsdp


def test_rate_exempt_names_neuron_groups_and_needs_the_rate_cost():
    from bispikclm.distill import TrainConfig

    assert TrainConfig.from_dict({"rate_cost": 5.0, "rate_exempt": ["attn"]}).rate_exempt == ["attn"]
    assert TrainConfig.from_dict({}).rate_exempt == []
    for values, message in (({"rate_cost": 5.0, "rate_exempt": ["attention"]}, "must list neuron groups"),
                            ({"rate_exempt": ["attn"]}, "only applies with rate_cost > 0"),
                            ({"rate_cost": 5.0, "rate_exempt": "attn"}, "must be list")):
        with pytest.raises(UserError, match=message):
            TrainConfig.from_dict(values)

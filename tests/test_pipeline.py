"""The shared pipeline (bispikclm.pipeline): every student kind and init from a recipe's ``student`` section on a
small real OPT teacher, and the one-line refusals of bad sections."""

from __future__ import annotations

import pytest
import torch

from bispikclm.configuration import BiSpikCLMConfig
from bispikclm.data import encode, load_texts, pack
from bispikclm.distill.init import INIT_MODES
from bispikclm.errors import InvalidConfig, UserError
from bispikclm.modeling import BiSpikCLMForCausalLM
from bispikclm.pipeline import STUDENT_KINDS, build_student, load_saved_teacher, student_config

from helpers import make_teacher, make_tokenizer


@pytest.fixture(scope="module")
def setup(data_dir, tmp_path_factory):
    """A saved 2-layer OPT teacher (run-folder layout: ``teacher/model``) and sequences of real WikiText-2 text."""
    folder = tmp_path_factory.mktemp("pipeline")
    tokenizer = make_tokenizer(data_dir, folder / "tok")
    make_teacher("opt", folder / "teacher" / "model", tokenizer)
    ids = encode(load_texts(str(data_dir / "wikitext-2"), "train")[:400], tokenizer)
    return load_saved_teacher(folder / "teacher"), pack(ids, 32)


def block_weight(model, teacher_layout: bool = False) -> torch.Tensor:
    """The first block's query projection (a BiSpikCLM student, or an OPT)."""
    layers = model.model.decoder.layers if teacher_layout else model.model.layers
    return layers[0].self_attn.q_proj.weight.detach()


def proportional(a: torch.Tensor, b: torch.Tensor) -> bool:
    return torch.allclose(a / a.std(), b / b.std(), atol=1e-5)


@pytest.mark.parametrize("kind", STUDENT_KINDS)
@pytest.mark.parametrize("init", INIT_MODES)
def test_each_kind_and_init_of_a_recipe_section(setup, kind, init):
    teacher, seqs = setup
    section = {"kind": kind, "init": init, "time_steps": 3}
    torch.manual_seed(1)      # not the teacher's seed: a random ANN of its shape would be the teacher
    student = build_student(teacher, section, seqs, seed=0)
    is_spiking = kind == "spiking"
    assert isinstance(student, BiSpikCLMForCausalLM) == is_spiking
    embedding, teacher_embedding = student.get_input_embeddings().weight, teacher.get_input_embeddings().weight
    assert torch.equal(embedding, teacher_embedding) == (init != "random")
    q_teacher = block_weight(teacher, teacher_layout=True)
    q_student = block_weight(student, teacher_layout=not is_spiking)
    # "all" copies the block linears rescaled; "calibrated" fits a spiking student's to the teacher's activations
    # (an ANN takes "all")
    assert proportional(q_student, q_teacher) == (init == "all" or (init == "calibrated" and not is_spiking))
    if not is_spiking:     # an ANN of the teacher's own shape and family with every weight copied is the teacher
        assert student.config.num_hidden_layers == teacher.config.num_hidden_layers
        if init in ("all", "calibrated"):
            ids = seqs[:2]
            torch.testing.assert_close(student.eval()(ids).logits, teacher(ids).logits)
        return
    assert student.config.time_steps == 3 and student.config.num_hidden_layers == teacher.config.num_hidden_layers
    assert not hasattr(student.config, "init") and not hasattr(student.config, "kind")
    thresholds = [b for n, b in student.named_buffers() if n.endswith("channel_threshold")]
    assert student.config.per_channel_neurons == (init == "calibrated") == bool(thresholds)
    if init == "calibrated":      # fitted to the teacher's activations: no longer the uniform starting value
        assert any(not torch.equal(b, torch.full_like(b, b.flatten()[0])) for b in thresholds)


def test_the_seed_and_the_calibration_sequences_make_the_student(setup):
    teacher, seqs = setup

    def built(seed: int, calibration_seed: int) -> torch.Tensor:
        torch.manual_seed(seed)
        student = build_student(teacher, {"init": "calibrated"}, seqs, seed=calibration_seed)
        return torch.cat([b.flatten() for n, b in student.named_buffers() if n.endswith("channel_threshold")])

    assert torch.equal(built(0, 0), built(0, 0))
    assert not torch.equal(built(0, 0), built(0, 1))      # other calibration sequences, other thresholds
    torch.manual_seed(1)
    random_a = block_weight(build_student(teacher, {}, seqs))
    torch.manual_seed(1)
    assert torch.equal(random_a, block_weight(build_student(teacher, {"kind": "spiking", "init": "random"}, seqs)))


@pytest.mark.parametrize("section, message", [
    ({"kind": "cnn"}, "student.kind must be one of ('spiking', 'ann'), got 'cnn'"),
    ({"init": "teacher"}, "student.init must be one of ('random', 'embeddings', 'all', 'calibrated'), got 'teacher'"),
    ({"time_step": 2}, "BiSpikCLMConfig has unknown settings ['time_step']"),
    ({"time_steps": 0}, "BiSpikCLMConfig.time_steps must be an integer >= 1, got 0"),
])
def test_a_bad_student_section_is_one_line(setup, section, message):
    teacher, seqs = setup
    with pytest.raises(UserError) as err:
        build_student(teacher, section, seqs)
    assert message in str(err.value) and "\n" not in str(err.value)


def test_calibrated_without_sequences_is_one_line(setup):
    teacher, _ = setup
    with pytest.raises(UserError, match="^student.init calibrated needs training sequences to calibrate on$"):
        build_student(teacher, {"init": "calibrated"})


def test_from_teacher_config_refuses_unknown_keys(setup):
    teacher, _ = setup
    with pytest.raises(InvalidConfig) as err:
        BiSpikCLMConfig.from_teacher_config(teacher.config, time_steps=2, init="all")
    text = str(err.value)
    assert text.startswith("BiSpikCLMConfig has unknown settings ['init'] (known: [") and "time_steps" in text
    assert "\n" not in text
    config = student_config(teacher.config, {"init": "all", "kind": "ann", "time_steps": 4})
    assert config.time_steps == 4 and not hasattr(config, "init")

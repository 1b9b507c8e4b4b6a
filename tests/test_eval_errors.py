"""Bad input to `bispikclm eval`: one-line errors and exit code 2."""

import shutil

import pytest

from helpers import eval_models
from bispikclm.cli import main
from bispikclm.evaluation.tasks import TASKS


@pytest.fixture(scope="module")
def folders(data_dir, tmp_path_factory):
    return eval_models(data_dir, tmp_path_factory.mktemp("eval-errors"), max_positions=512)


def error_of(argv, capsys) -> str:
    assert main(argv) == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]   # after any loading progress bar
    assert last.startswith("bispikclm eval: error: ")
    return last


def test_unknown_task_lists_known_ones(folders, capsys):
    message = error_of(["eval", "zeroshot", "--model", str(folders[0]), "--tasks", "arc_easy,mmlu"], capsys)
    assert "'mmlu'" in message and all(name in message for name in TASKS)


def test_missing_task_file(folders, tmp_path, capsys):
    message = error_of(["eval", "zeroshot", "--model", str(folders[0]), "--tasks", "piqa",
                        "--data-dir", str(tmp_path)], capsys)
    assert "piqa.jsonl not found" in message


def test_malformed_jsonl_line_names_file_and_line(folders, data_dir, tmp_path, capsys):
    (tmp_path / "zeroshot").mkdir()
    with open(data_dir / "zeroshot" / "boolq.jsonl") as source:
        good = [next(source) for _ in range(2)]
    (tmp_path / "zeroshot" / "boolq.jsonl").write_text("".join(good) + '{"id": "x", "prompt": "broken\n')
    message = error_of(["eval", "zeroshot", "--model", str(folders[0]), "--tasks", "boolq",
                        "--data-dir", str(tmp_path)], capsys)
    assert "boolq.jsonl:3: malformed JSON line" in message
    (tmp_path / "zeroshot" / "boolq.jsonl").write_text(good[0] + '{"id": "y", "prompt": "p", "choices": [" a"]}\n')
    message = error_of(["eval", "zeroshot", "--model", str(folders[0]), "--tasks", "boolq",
                        "--data-dir", str(tmp_path)], capsys)
    assert "boolq.jsonl:2: missing field(s) ['answer']" in message


@pytest.mark.parametrize("command", ["ppl", "sweep"])
def test_context_beyond_positions(folders, capsys, command):
    extra = ["--thresholds", "1.0"] if command == "sweep" else []
    message = error_of(["eval", command, "--model", str(folders[1]), "--context-lengths", "256,1024", *extra], capsys)
    assert "context length 1024 is beyond the model's 512 positions" in message


def test_checkpoint_path_that_is_not_a_model(folders, tmp_path, capsys):
    for path in (tmp_path, tmp_path / "missing", folders[0] / "config.json"):
        message = error_of(["eval", "ppl", "--model", str(path)], capsys)
        assert "is not a model checkpoint" in message
    no_tokenizer = tmp_path / "no-tokenizer"
    shutil.copytree(folders[0], no_tokenizer, ignore=shutil.ignore_patterns("tokenizer*"))
    assert "has no usable tokenizer" in error_of(["eval", "ppl", "--model", str(no_tokenizer)], capsys)


def test_spiking_overrides_need_a_student(folders, capsys):
    message = error_of(["eval", "ppl", "--model", str(folders[0]), "--threshold", "0.7"], capsys)
    assert "only apply to BiSpikCLM students" in message
    message = error_of(["eval", "sweep", "--model", str(folders[0]), "--thresholds", "0.7"], capsys)
    assert "sweeps need a BiSpikCLM student" in message

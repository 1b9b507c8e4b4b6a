"""Zero-shot: our evaluator against real lm-evaluation-harness on the same models and task subset."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from lm_eval import simple_evaluate
from lm_eval.tasks import TaskManager

from helpers import eval_models
from bispikclm.checkpoints import load_pretrained
from bispikclm.evaluation.lm_eval_adapter import TASKS_DIR
from bispikclm.evaluation.zeroshot import encode_pair, evaluate_tasks, loglikelihoods

TASKS = ["arc_easy", "piqa", "winogrande", "lambada_openai"]
LIMIT = 40
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def folders(data_dir, tmp_path_factory):
    return eval_models(data_dir, tmp_path_factory.mktemp("eval-zeroshot"))


@pytest.mark.parametrize("which", [0, 1], ids=["opt-teacher", "student"])
def test_agrees_with_lm_eval(folders, data_dir, which):
    folder = str(folders[which])
    model, tokenizer = load_pretrained(folder)
    ours = evaluate_tasks(model, tokenizer, TASKS, data_dir, limit=LIMIT, batch_size=8, progress=False)["tasks"]
    theirs = simple_evaluate(model="bispikclm", model_args={"pretrained": folder}, tasks=[f"bispikclm_{t}" for t in TASKS],
                             limit=LIMIT, batch_size=8, task_manager=TaskManager(include_path=str(TASKS_DIR),
                                                                                 metadata={"data_dir": str(data_dir)}),
                             bootstrap_iters=0)["results"]
    for task in TASKS:
        reference = theirs[f"bispikclm_{task}"]
        assert ours[task]["n"] == LIMIT
        assert ours[task]["acc"] == pytest.approx(reference["acc,none"], abs=0.005)
        if task == "lambada_openai":
            assert ours[task]["perplexity"] == pytest.approx(reference["perplexity,none"], rel=1e-3)
        else:
            assert ours[task]["acc_norm"] == pytest.approx(reference["acc_norm,none"], abs=0.005)


def test_encode_pair_moves_trailing_space(folders):
    _, tokenizer = load_pretrained(str(folders[0]))
    context, continuation = encode_pair(tokenizer, "The cat sat on the ", "mat")
    assert tokenizer.decode(context) == "The cat sat on the"
    assert tokenizer.decode(continuation) == " mat"
    assert encode_pair(tokenizer, "", " mat")[0] == [tokenizer.bos_token_id]


def test_lm_eval_command_line_runs_offline(folders, data_dir, tmp_path):
    """`bispikclm eval lm-eval ...` registers the model, finds our tasks and writes lm-eval's results."""
    command = [sys.executable, "-m", "bispikclm", "eval", "lm-eval", "--model", "bispikclm", "--model_args",
               f"pretrained={folders[1]},time_steps=1", "--tasks", "bispikclm_copa", "--limit", "8",
               "--output_path", str(tmp_path), "--metadata", json.dumps({"data_dir": str(data_dir)})]
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=300,
                          env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-2000:]
    results = json.loads(next(tmp_path.rglob("results_*.json")).read_text())
    assert results["results"]["bispikclm_copa"]["acc,none"] >= 0
    assert results["config"]["model_args"]["time_steps"] == 1


@pytest.mark.parametrize("which", [0, 1], ids=["opt-teacher", "student"])
def test_continuation_longer_than_the_positions_is_scored_on_its_last_tokens(folders, data_dir, which):
    """A continuation that does not fit the model's positions: its tokens that have a prediction inside the last
    window are scored, the same as scoring that window directly."""
    model, tokenizer = load_pretrained(str(folders[which]))
    model.config.max_position_embeddings = limit = 24          # positions beyond 24 are never used below
    words = (data_dir / "wikitext-2" / "test.txt").read_text(encoding="utf-8").split()[:60]
    context, continuation = " ".join(words[:10]), " " + " ".join(words[10:])
    context_ids, continuation_ids = encode_pair(tokenizer, context, continuation)
    assert len(continuation_ids) > limit + 1
    (ll, _), = loglikelihoods(model, tokenizer, [(context, continuation)], progress=False)
    window = torch.tensor([(context_ids + continuation_ids)[-(limit + 1):]])
    with torch.no_grad():
        logprobs = model(window[:, :-1]).logits.float().log_softmax(-1)
    assert ll == pytest.approx(float(logprobs.gather(-1, window[:, 1:, None]).sum()), rel=1e-5)

"""The command line answers ``--help`` and argument errors without loading torch (each command imports what a run
needs inside ``run``), and the package still registers BiSpikCLM with the Auto classes wherever models load.
Each check runs in a fresh interpreter, so that what this test process imported does not count."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from bispikclm.cli import COMMANDS

REPO = Path(__file__).resolve().parents[1]
HEAVY = ("torch", "transformers", "matplotlib", "accelerate", "numpy", "lm_eval")

PARSE = """
import contextlib, io, json, sys
from bispikclm.cli import main
codes = []
for argv in json.loads(sys.argv[1]):
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        try:
            main(argv)
        except SystemExit as stop:
            codes.append(stop.code)
print(json.dumps({"codes": codes, "loaded": [m for m in json.loads(sys.argv[2]) if m in sys.modules]}))
"""


def fresh(code: str, *args: str) -> str:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    done = subprocess.run([sys.executable, "-c", code, *args], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_help_and_argument_errors_do_not_import_torch():
    """``bispikclm --help``, every command's ``--help`` (every eval subcommand's too) and argument errors: argparse
    exits (0 for help, 2 for errors) with none of the heavy libraries imported."""
    helps = [["--help"], *([name, "--help"] for name in COMMANDS),
             *(["eval", sub, "--help"] for sub in ("ppl", "zeroshot", "sweep", "parity"))]
    errors = [[], ["nope"], ["train"], ["train", "quickstart"], ["eval", "ppl", "--stride", "x"],
              ["energy", "student", "--precision", "float16"], ["generate", "student"], ["quickstart", "--tokens"]]
    result = json.loads(fresh(PARSE, json.dumps(helps + errors), json.dumps(HEAVY)))
    assert result["codes"] == [0] * len(helps) + [2] * len(errors)
    assert result["loaded"] == []


def test_every_command_module_imports_light():
    """Each command module on its own imports none of the heavy libraries at its top."""
    code = ("import importlib, json, sys\n"
            "loaded = {}\n"
            "for name in json.loads(sys.argv[1]):\n"
            "    importlib.import_module('bispikclm.commands.' + name)\n"
            "    loaded[name] = [m for m in json.loads(sys.argv[2]) if m in sys.modules]\n"
            "print(json.dumps(loaded))")
    assert json.loads(fresh(code, json.dumps(list(COMMANDS)), json.dumps(HEAVY))) == {n: [] for n in COMMANDS}


def test_loading_code_registers_the_student_with_the_auto_classes():
    """Importing the loaders (or any public name of the package) registers BiSpikCLM with AutoConfig and
    AutoModelForCausalLM, as the eager package import did."""
    code = ("import sys\n"
            "import importlib\n"
            "importlib.import_module(sys.argv[1])\n"
            "from transformers import AutoConfig, AutoModelForCausalLM\n"
            "config = AutoConfig.for_model('bispikclm', vocab_size=64, hidden_size=32, num_hidden_layers=1,\n"
            "                              num_attention_heads=2, ffn_dim=64, max_position_embeddings=16)\n"
            "print(type(AutoModelForCausalLM.from_config(config)).__name__)")
    for module in ("bispikclm.checkpoints", "bispikclm.modeling"):
        assert fresh(code, module).strip() == "BiSpikCLMForCausalLM"
    from_name = "from bispikclm import BiSpikCLMConfig\n" + code.replace("importlib.import_module(sys.argv[1])\n", "")
    assert fresh(from_name).strip() == "BiSpikCLMForCausalLM"

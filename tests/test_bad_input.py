"""Bad input thrown at every command and loader, generated with hypothesis: invalid and contradictory config
values, recipes with unknown keys or wrong types, truncated and corrupt safetensors, checkpoints of another
model, a tokenizer of another vocabulary, empty / binary / non-UTF-8 text, prompts beyond the positions, missing
data folders. Each case must end in a one-line error naming the problem, exit code 2, no traceback, and leave
the output folder exactly as it was.

``CASES`` counts the examples run per kind; ``conftest.py`` prints it after the tests, and with
``BISPIKCLM_BAD_INPUT_JSON=path`` it is also written there (see ``benchmarks/bad_input_report.py``)."""

from __future__ import annotations

import json
import math
import os
import shutil
import struct
import subprocess
import tempfile
from collections import Counter
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bispikclm import BiSpikCLMConfig
from bispikclm.cli import main
from bispikclm.recipes.schema import DATA_TYPES, SOURCE_TYPES, STUDENT_KEYS
from bispikclm.distill import TrainConfig
from bispikclm.errors import UserError
from bispikclm.neurons import SURROGATES
from helpers import cli_command, eval_models, make_tokenizer, write_recipe

CASES: Counter = Counter()
POSITIONS = 64


def cases(n: int) -> settings:
    """Hypothesis settings: ``n`` examples, the same ones on every run (derandomized), no time limit."""
    return settings(max_examples=n, deadline=None, derandomize=True, database=None,
                    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


@pytest.fixture(scope="module", autouse=True)
def write_counts():
    yield
    if os.environ.get("BISPIKCLM_BAD_INPUT_JSON"):
        Path(os.environ["BISPIKCLM_BAD_INPUT_JSON"]).write_text(json.dumps(dict(sorted(CASES.items())), indent=1))


# ---- real components: a tiny OPT teacher and BiSpikCLM student, a trained run, a folder of earlier results ----

@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("bad-input")


@pytest.fixture(scope="module")
def models(data_dir, root) -> tuple[Path, Path]:
    """(OPT teacher, BiSpikCLM student) folders, each with its tokenizer (1,024 tokens), 64 positions."""
    return eval_models(data_dir, root / "models", max_positions=POSITIONS)


@pytest.fixture(scope="module")
def big_tokenizer(data_dir, root) -> Path:
    """A tokenizer of 2,048 tokens: more than the models' vocabulary."""
    folder = root / "big-tokenizer"
    make_tokenizer(data_dir, folder, vocab_size=2048)
    return folder


@pytest.fixture(scope="module")
def results(root) -> Path:
    """An output folder holding earlier results, which no failing command may touch."""
    folder = root / "results"
    (folder / "report").mkdir(parents=True)
    for name in ("ppl.json", "ppl.md", "energy.json", "audit.json", "report/report.html"):
        (folder / name).write_text(f"earlier {name}\n")
    return folder


@pytest.fixture(scope="module")
def recipe(models, data_dir, root) -> dict:
    """A recipe that trains (see ``trained_run``): the base every bad recipe is made from."""
    return yaml.safe_load(write_recipe(root / "recipe.yaml", models[0], data_dir, tokens=4 * 32 * 2).read_text())


@pytest.fixture(scope="module")
def trained_run(recipe, root) -> Path:
    """A run folder with a checkpoint, trained by the real command."""
    out = root / "run"
    path = root / "good.yaml"
    path.write_text(yaml.safe_dump(recipe))
    assert main(["train", str(path), "--out", str(out), "--no-progress"]) == 0
    assert (out / "checkpoints" / "latest").is_file()
    return out


def snapshot(folder: Path) -> dict:
    """Every file under ``folder``: size, modification time and content."""
    if not folder.exists():
        return {}
    return {str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns, p.read_bytes())
            for p in sorted(folder.rglob("*")) if p.is_file()}


def expect_error(argv: list[str], capsys, kind: str, names: tuple[str, ...] = (), keep: tuple[Path, ...] = ()) -> str:
    """Run ``bispikclm ARGV`` in this process: exit code 2, a one-line ``bispikclm CMD: error: ...`` message that
    holds every string of ``names``, no traceback, and every folder of ``keep`` unchanged (files, times,
    contents; a folder that did not exist still does not). Counts the case under ``kind``."""
    before = [snapshot(folder) for folder in keep]
    code = main([str(a) for a in argv])
    err = capsys.readouterr().err
    assert code == 2, err[-2000:]
    assert "Traceback" not in err
    message = err.strip().splitlines()[-1]       # after any loading progress bar or warning
    assert message.startswith(f"bispikclm {argv[0]}: error: "), err[-2000:]
    for name in names:
        assert str(name) in message, message
    assert [snapshot(folder) for folder in keep] == before, "a failing command changed its output folder"
    CASES[kind] += 1
    return message


def save_recipe(recipe: dict, folder: Path) -> Path:
    path = folder / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe, allow_unicode=True))
    return path


# ---- hypothesis strategies of bad values ----------------------------------------------------------------------

NAMES = st.text(alphabet="abcdefghijklmnopqrstuvwxyz_", min_size=3, max_size=12)
NOT_A_NUMBER = st.one_of(st.text(max_size=6), st.booleans(), st.lists(st.integers(), max_size=2),
                         st.dictionaries(NAMES, st.integers(), max_size=1))
NOT_FINITE = st.sampled_from([math.nan, math.inf, -math.inf])
FRACTIONS = st.floats(allow_nan=False, allow_infinity=False).filter(lambda v: v != int(v))   # not whole numbers


def bad_int(low: int) -> st.SearchStrategy:
    """Not an integer >= ``low``: too small, a float, not finite, not a number."""
    return st.one_of(st.integers(max_value=low - 1), FRACTIONS, NOT_FINITE, NOT_A_NUMBER, st.none())


def bad_float(low: float, high: float | None = None, open_low: bool = True) -> st.SearchStrategy:
    """Not a finite number in the range: below (or at) ``low``, above ``high``, NaN / inf, not a number."""
    below = st.floats(max_value=low, exclude_max=not open_low, allow_nan=False, allow_infinity=False)
    out = [below, NOT_FINITE, NOT_A_NUMBER]
    if high is not None:
        out.append(st.floats(min_value=high, exclude_min=True, allow_nan=False, allow_infinity=False))
    return st.one_of(*out)


def bad_choice(known: tuple) -> st.SearchStrategy:
    return st.one_of(st.text(max_size=8).filter(lambda v: v not in known), st.integers(), st.booleans())


# field of BiSpikCLMConfig -> its bad values
CONFIG_VALUES = {
    **{f: bad_int(1) for f in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "ffn_dim",
                               "max_position_embeddings", "time_steps")},
    "threshold": bad_float(0.0), "attn_threshold": bad_float(0.0), "beta": bad_float(0.0, 1.0, open_low=False),
    "input_rate": bad_float(0.0, 1.0), "residual_scale": bad_float(0.0), "input_gain": bad_float(0.0),
    **{f: bad_int(1).filter(lambda v: v is not None) for f in ("attn_chunk_size", "head_dim")},   # None is valid
    "ffn_type": bad_choice(("mlp", "gated")), "ffn_gate": bad_choice(("select", "and")),
    "surrogate": bad_choice(tuple(SURROGATES)),
    "neuron_backend": bad_choice(("lean", "reference")),
    "neuron_overrides": st.one_of(st.dictionaries(NAMES, st.dictionaries(NAMES, st.floats()), min_size=1,
                                                  max_size=1), st.integers()),
}


@st.composite
def contradictory_shape(draw) -> dict:
    """Heads that do not divide the width, or K/V heads that do not divide the heads."""
    if draw(st.booleans()):
        heads = draw(st.integers(2, 12))
        width = draw(st.integers(heads + 1, 256).filter(lambda w: w % heads))
        return {"hidden_size": width, "num_attention_heads": heads}
    kv = draw(st.integers(2, 8))
    heads = draw(st.integers(kv + 1, 16).filter(lambda h: h % kv))
    return {"hidden_size": 8 * heads, "num_attention_heads": heads, "num_key_value_heads": kv}


BAD_CONFIG = st.one_of(
    st.sampled_from(sorted(CONFIG_VALUES)).flatmap(lambda f: CONFIG_VALUES[f].map(lambda v: ("value", {f: v}))),
    contradictory_shape().map(lambda shape: ("contradictory", shape)))


def wrong_type(annotation: str) -> st.SearchStrategy:
    """Values that are not of the (simple) annotation."""
    kinds = {"int": st.one_of(st.text(min_size=1, max_size=5), FRACTIONS, st.booleans(), NOT_FINITE),
             "float": st.one_of(st.text(min_size=1, max_size=5), st.booleans(), NOT_FINITE, st.lists(st.integers())),
             "str": st.one_of(st.integers(), st.lists(st.integers(), max_size=2), st.booleans()),
             "bool": st.one_of(st.integers(), st.text(min_size=1, max_size=5)),
             "dict": st.one_of(st.integers(), st.text(max_size=5), st.lists(st.integers(), max_size=2)),
             "tuple": st.one_of(st.integers(), st.text(max_size=5), st.lists(st.text(min_size=1), min_size=1))}
    return kinds[annotation.split("|")[0].strip().split("[")[0]]


@st.composite
def bad_recipe_edit(draw, recipe: dict) -> tuple[str, dict]:
    """(kind, a copy of ``recipe`` with one section broken: an unknown key, or a value of the wrong type)."""
    recipe = json.loads(json.dumps(recipe))
    section = draw(st.sampled_from(["teacher", "tokenizer", "data", "data.train", "student", "train"]))
    unknown = draw(st.booleans())
    if section in ("teacher", "tokenizer"):       # a name: a mapping or a number is the wrong type
        recipe[section] = draw(st.one_of(st.dictionaries(NAMES, st.integers(), min_size=1, max_size=2), st.integers(),
                                         st.lists(NAMES, min_size=1, max_size=2), st.booleans()))
        return f"recipe: wrong type ({section})", recipe
    node, known = {"data": (recipe["data"], DATA_TYPES),
                   "data.train": (recipe["data"]["train"], SOURCE_TYPES),
                   "student": (recipe["student"], BiSpikCLMConfig.__annotations__),
                   "train": (recipe["train"], TrainConfig.__annotations__)}[section]
    if unknown:
        node[draw(NAMES.filter(lambda k: k not in known and k not in STUDENT_KEYS))] = draw(st.integers())
        return f"recipe: unknown key ({section.split('.')[0]})", recipe
    key = draw(st.sampled_from(sorted(known)))
    node[key] = draw(wrong_type(known[key]))
    return f"recipe: wrong type ({section.split('.')[0]})", recipe


# ---- config values --------------------------------------------------------------------------------------------

@cases(60)
@given(case=BAD_CONFIG)
def test_config_rejects_bad_values(case):
    """The library: BiSpikCLMConfig raises one error (a UserError and a ValueError) naming the field."""
    kind, values = case
    with pytest.raises(UserError) as raised:
        BiSpikCLMConfig.from_preset("tiny", **values)
    assert isinstance(raised.value, ValueError)
    assert any(f"BiSpikCLMConfig.{field}" in str(raised.value) for field in values), str(raised.value)
    assert "\n" not in str(raised.value)
    CASES[f"config: {kind} (library)"] += 1


@cases(10)
@given(case=BAD_CONFIG)
def test_train_rejects_bad_student_config(case, recipe, capsys):
    kind, values = case
    with tempfile.TemporaryDirectory() as tmp:
        bad = {**recipe, "student": {**recipe["student"], **values}}
        out = Path(tmp) / "run"
        message = expect_error(["train", save_recipe(bad, Path(tmp)), "--out", out, "--no-progress"], capsys,
                               f"config: {kind} (train)", keep=(out,))
    assert any(field in message for field in values), message


@cases(6)
@given(field=st.sampled_from(["threshold", "time_steps"]), data=st.data())
def test_eval_rejects_bad_overrides(field, data, models, results, data_dir, capsys):
    value = data.draw(st.one_of(NOT_FINITE, st.floats(max_value=0, allow_nan=False)) if field == "threshold"
                      else st.integers(max_value=0))
    flag = "--" + field.replace("_", "-")
    expect_error(["eval", "ppl", "--model", models[1], "--data-dir", data_dir, "--context-lengths", "32",
                  "--max-tokens", "64", f"{flag}={value}", "--out", results], capsys,
                 "config: value (eval override)", names=(field,), keep=(results,))


@cases(8)
@given(case=BAD_CONFIG, command=st.sampled_from(["eval", "generate", "energy", "audit"]))
def test_checkpoint_with_bad_config_json(case, command, models, results, data_dir, capsys):
    kind, values = case
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(shutil.copytree(models[1], Path(tmp) / "student"))
        config = json.loads((folder / "config.json").read_text())
        (folder / "config.json").write_text(json.dumps({**config, **values}))
        message = expect_error(command_on(command, folder, data_dir, results), capsys,
                               f"config: {kind} (config.json)", names=(str(folder),), keep=(results,))
    assert any(field in message for field in values), message


# ---- recipes --------------------------------------------------------------------------------------------------

@cases(24)
@given(data=st.data())
def test_train_rejects_bad_recipe(data, recipe, capsys):
    kind, bad = data.draw(bad_recipe_edit(recipe))
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "run"
        expect_error(["train", save_recipe(bad, Path(tmp)), "--out", out, "--no-progress"], capsys, kind,
                     keep=(out,))


@cases(8)
@given(data=st.data())
def test_quickstart_rejects_bad_recipe(data, data_dir, capsys):
    from bispikclm.recipes import load_recipe

    recipe = load_recipe("quickstart")
    section = data.draw(st.sampled_from(["tokenizer", "teacher", "teacher_train", "student", "train"]))
    if data.draw(st.booleans()):
        recipe[section][data.draw(NAMES.filter(lambda k: k not in recipe[section]))] = 1
        kind = f"quickstart recipe: unknown key ({section})"
    else:
        key = data.draw(st.sampled_from(sorted(recipe[section])))
        recipe[section][key] = data.draw(wrong_type({dict: "dict", str: "str", float: "float"}.get(
            type(recipe[section][key]), "int")))
        kind = f"quickstart recipe: wrong type ({section})"
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "run"
        expect_error(["quickstart", "--recipe", save_recipe(recipe, Path(tmp)), "--data", data_dir, "--out", out,
                      "--cache-dir", Path(tmp) / "cache", "--no-progress"], capsys, kind, names=(section,),
                     keep=(out,))


# ---- checkpoints: truncated and corrupt safetensors, another model, another tokenizer --------------------------

def command_on(command: str, checkpoint: Path, data_dir: Path, results: Path, text: Path | None = None) -> list:
    """A command line that loads ``checkpoint`` and would write into ``results``."""
    text = text or data_dir / "wikitext-2" / "test.txt"
    return {"eval": ["eval", "ppl", "--model", checkpoint, "--data-dir", data_dir, "--context-lengths", "32",
                     "--max-tokens", "64", "--out", results],
            "generate": ["generate", checkpoint, "--prompt", "The game", "--max-new-tokens", "2"],
            "energy": ["energy", checkpoint, "--text", text, "--seq-len", "16", "--json", results / "energy.json"],
            "audit": ["audit", checkpoint, "--text", text, "--tokens", "16", "--json", results / "audit.json"]}[command]


def tensors(path: Path) -> tuple[int, dict]:
    """(size of the safetensors header block, {name: entry}) of a safetensors file."""
    data = path.read_bytes()
    size = struct.unpack("<Q", data[:8])[0]
    return 8 + size, {k: v for k, v in json.loads(data[8:8 + size]).items() if k != "__metadata__"}


@st.composite
def damage(draw, path: Path, kinds=("truncated", "garbled header", "NaN weights")) -> tuple[str, bytes]:
    """(kind, damaged bytes of the safetensors file ``path``): truncated, a byte of the tensor table garbled
    (not of the free-form ``__metadata__``, which holds no weights), or a float tensor's bytes overwritten with
    NaN patterns."""
    data = path.read_bytes()
    header, entries = tensors(path)
    how = draw(st.sampled_from(kinds))
    if how == "truncated":
        return "safetensors: truncated", data[:draw(st.integers(0, len(data) - 1))]
    if how == "garbled header":
        table = data.index(b"}", data.index(b"__metadata__")) + 1 if b"__metadata__" in data[:header] else 8
        at = draw(st.integers(table, header - 1).filter(lambda i: data[i:i + 1] not in b" \t\r\n"))
        byte = draw(st.integers(0, 255).filter(lambda b: b != data[at] and bytes([b]) not in b" \t\r\n"))
        return "safetensors: garbled header", data[:at] + bytes([byte]) + data[at + 1:]
    name = draw(st.sampled_from(sorted(n for n, e in entries.items()
                                       if e["dtype"] == "F32" and e["data_offsets"][1] > e["data_offsets"][0])))
    start, end = (header + o for o in entries[name]["data_offsets"])
    return "safetensors: NaN weights", data[:start] + b"\xff" * (end - start) + data[end:]


@cases(20)
@given(data=st.data(), command=st.sampled_from(["eval", "generate", "energy", "audit", "train"]))
def test_damaged_safetensors(data, command, models, recipe, results, data_dir, capsys):
    """A damaged student, or for ``train`` a damaged teacher (truncated or NaN: a teacher whose tensor table names
    other tensors loads with transformers' fresh values for them, and its load report, see the report)."""
    model = models[0] if command == "train" else models[1]
    kinds = ("truncated", "NaN weights") if command == "train" else ("truncated", "garbled header", "NaN weights")
    kind, damaged = data.draw(damage(model / "model.safetensors", kinds))
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(shutil.copytree(model, Path(tmp) / "model"))
        (folder / "model.safetensors").write_bytes(damaged)
        out = Path(tmp) / "run"
        argv = (["train", save_recipe({**recipe, "teacher": str(folder)}, Path(tmp)), "--out", out, "--no-progress"]
                if command == "train" else command_on(command, folder, data_dir, results))
        expect_error(argv, capsys, kind, names=(str(folder),), keep=(results, out))


@cases(4)
@given(command=st.sampled_from(["generate", "energy", "sweep", "report"]))
def test_another_model_where_a_student_is_expected(command, models, results, data_dir, capsys):
    """An OPT folder given where a BiSpikCLM student is expected (generate runs any causal LM with PyTorch; only its
    packed engine needs a student)."""
    with tempfile.TemporaryDirectory() as tmp:
        run_dir = Path(tmp)
        shutil.copytree(models[0], run_dir / "student")
        argv = {"sweep": ["eval", "sweep", "--model", models[0], "--data-dir", data_dir, "--thresholds", "1.0",
                          "--context-lengths", "32", "--max-tokens", "64", "--out", results],
                "report": ["report", run_dir, "--out", results / "report", "--text",
                           data_dir / "wikitext-2" / "test.txt"]}.get(command) or command_on(command, models[0],
                                                                                            data_dir, results)
        if command == "generate":
            argv = [*argv, "--engine", "packed"]
        expect_error(argv, capsys, "checkpoint of another model", names=("BiSpikCLM student",), keep=(results,))


@cases(4)
@given(width=st.sampled_from([32, 96, 128]), command=st.sampled_from(["eval", "generate", "energy", "audit"]))
def test_weights_of_another_shape(width, command, models, results, data_dir, capsys):
    """A student's weights under a config.json of another width."""
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(shutil.copytree(models[1], Path(tmp) / "student"))
        config = json.loads((folder / "config.json").read_text())
        (folder / "config.json").write_text(json.dumps({**config, "hidden_size": width, "ffn_dim": 2 * width}))
        expect_error(command_on(command, folder, data_dir, results), capsys, "checkpoint of another model",
                     names=(str(folder), "another shape"), keep=(results,))


@cases(4)
@given(command=st.sampled_from(["eval", "generate", "energy", "audit"]))
def test_tokenizer_of_another_vocabulary(command, models, big_tokenizer, results, data_dir, capsys):
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(shutil.copytree(models[1], Path(tmp) / "student"))
        for f in big_tokenizer.iterdir():
            shutil.copy(f, folder / f.name)
        expect_error(command_on(command, folder, data_dir, results), capsys, "tokenizer vocabulary mismatch",
                     names=("vocabulary mismatch", "2048"), keep=(results,))


def test_train_with_tokenizer_of_another_vocabulary(recipe, big_tokenizer, tmp_path, capsys):
    out = tmp_path / "run"
    expect_error(["train", save_recipe({**recipe, "tokenizer": str(big_tokenizer)}, tmp_path), "--out", out,
                  "--no-progress"], capsys, "tokenizer vocabulary mismatch", names=("vocabulary mismatch",),
                 keep=(out,))


@cases(6)
@given(data=st.data())
def test_resume_with_another_config_or_data(data, recipe, trained_run, capsys):
    """Resume a run with another student config, train config or data, or train again into it without
    --resume: the run's checkpoints, data and metrics stay as they were."""
    bad = json.loads(json.dumps(recipe))
    change = data.draw(st.sampled_from(["student", "train", "data", "no --resume"]))
    if change == "student":
        bad["student"][data.draw(st.sampled_from(["time_steps", "threshold"]))] = data.draw(st.integers(3, 6))
    elif change == "train":
        bad["train"][data.draw(st.sampled_from(["lr", "tau"]))] = data.draw(st.floats(0.01, 1.0))
    elif change == "data":
        bad["data"]["train"]["max_documents"] = data.draw(st.integers(10, 1999))
    resume = [] if change == "no --resume" else ["--resume"]
    with tempfile.TemporaryDirectory() as tmp:
        expect_error(["train", save_recipe(bad, Path(tmp)), "--out", trained_run, "--no-progress", *resume],
                     capsys, "resume with another config or data", keep=(trained_run,))


# ---- text: empty, binary, non-UTF-8; missing data folders; prompts beyond the positions ------------------------

BAD_TEXT = st.one_of(
    st.text(alphabet=" \t\n", max_size=20).map(lambda t: ("empty", t.encode())),
    st.binary(min_size=1, max_size=200).map(lambda b: ("binary", b[: len(b) // 2] + b"\x00" + b[len(b) // 2:])),
    st.tuples(st.text(alphabet="abc xyz\n", max_size=100), st.sampled_from([b"\xff", b"\xc3\x28", b"\xe9t\xe9"]))
    .map(lambda p: ("non-UTF-8", p[0].encode() + p[1] + p[0].encode())))


@cases(20)
@given(case=BAD_TEXT, command=st.sampled_from(["train", "eval", "energy", "audit", "report", "quickstart"]))
def test_bad_text_files(case, command, recipe, models, results, data_dir, capsys):
    kind, content = case
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        data = tmp / "data"
        for name in ("wikitext-2/train.txt", "wikitext-2/valid.txt", "wikitext-2/test.txt",
                     "wikitext-2-raw/wiki.test.raw"):
            (data / name).parent.mkdir(parents=True, exist_ok=True)
            (data / name).write_bytes(content)
        text, out = data / "wikitext-2" / "test.txt", tmp / "run"
        if command == "train":
            bad = {**recipe, "data": {"train": {"source": str(data / "wikitext-2" / "train.txt")}}}
            argv = ["train", save_recipe(bad, tmp), "--out", out, "--no-progress"]
        elif command == "report":
            shutil.copytree(models[1], tmp / "student")
            argv = ["report", tmp, "--text", text, "--out", results / "report"]
        elif command == "quickstart":
            argv = ["quickstart", "--data", data, "--out", out, "--cache-dir", tmp / "cache", "--no-progress"]
        else:
            argv = command_on(command, models[1], data, results, text=text)
        expect_error(argv, capsys, f"text: {kind}", names=(str(data),), keep=(results, out))


@cases(10)
@given(name=NAMES, command=st.sampled_from(["train", "eval", "zeroshot", "energy", "quickstart", "report"]))
def test_missing_data_folders(name, command, recipe, models, results, tmp_path, capsys):
    missing, out = tmp_path / name / "data", tmp_path / "run"
    argv = {"train": ["train", None, "--out", out, "--no-progress"],
            "eval": ["eval", "ppl", "--model", models[1], "--data-dir", missing, "--context-lengths", "32",
                     "--out", results],
            "zeroshot": ["eval", "zeroshot", "--model", models[1], "--data-dir", missing, "--tasks", "piqa",
                         "--out", results],
            "energy": ["energy", models[1], "--text", missing / "test.txt", "--seq-len", "16", "--json",
                       results / "energy.json"],
            "quickstart": ["quickstart", "--data", missing, "--out", out, "--cache-dir", tmp_path / "cache"],
            "report": ["report", missing, "--out", results / "report"]}[command]
    if command == "train":
        argv[1] = save_recipe({**recipe, "data": {"train": {"source": str(missing)}}}, tmp_path)
    expect_error(argv, capsys, "missing data folder", names=(str(missing),), keep=(results, out))


@cases(6)
@given(words=st.integers(12, 80), new=st.integers(1, 40), engine=st.sampled_from(["torch", "packed"]))
def test_prompt_beyond_positions(words, new, engine, models, capsys):
    prompt = " ".join(["The game began in the north"] * words)
    message = expect_error(["generate", models[1], "--prompt", prompt, "--max-new-tokens", new, "--engine", engine],
                           capsys, "prompt beyond the positions", names=(f"{POSITIONS} positions",))
    assert f"--max-new-tokens {new}" in message


# ---- end to end, in fresh processes ---------------------------------------------------------------------------

def test_fresh_processes_exit_2_without_traceback(models, recipe, results, tmp_path):
    """The console entry point: one line on stderr, exit code 2, no traceback, results untouched."""
    damaged = Path(shutil.copytree(models[1], tmp_path / "student"))
    data = (damaged / "model.safetensors").read_bytes()
    (damaged / "model.safetensors").write_bytes(data[: len(data) // 3])
    recipe_path = save_recipe({**recipe, "train": {**recipe["train"], "lr": "fast"}}, tmp_path)
    before = snapshot(results)
    cases = ((["audit", str(damaged), "--json", str(results / "audit.json")], (str(damaged),)),
             (["train", str(recipe_path), "--out", str(tmp_path / "run")], ("train.lr",)))
    running = []
    for args, _ in cases:                  # both at once: most of their time is importing torch
        argv, env = cli_command(*args)
        if args[0] != "train":
            argv.remove("--no-progress")
        running.append(subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    for (args, names), process in zip(cases, running):
        _, stderr = process.communicate(timeout=120)
        assert process.returncode == 2 and "Traceback" not in stderr, stderr[-2000:]
        message = stderr.strip().splitlines()[-1]
        assert message.startswith(f"bispikclm {args[0]}: error: ") and all(n in message for n in names), message
        CASES["fresh process"] += 1
    assert snapshot(results) == before and not (tmp_path / "run").exists()

"""The zero-shot task registry: names, files, and a strict JSONL reader.

Multiple-choice items are ``{"id", "prompt", "choices", "answer"}`` (each choice carries its leading space);
LAMBADA items are ``{"id", "context", "continuation"}``. Files live under the data folder
(``$BISPIKCLM_DATA``, default ``<repo>/../shared/data``), see its README.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from ...data import default_data_dir
from ...errors import UserError

#: The folder of the harness's YAML task files (``--include_path``).
TASKS_DIR = Path(__file__).parent


@dataclass(frozen=True)
class Task:
    """A zero-shot task: its name, its file relative to the data folder, and its kind."""

    name: str
    path: str
    kind: str  # "multiple_choice" or "lambada"


PAPER_TASKS = ("arc_easy", "arc_challenge", "winogrande", "boolq", "piqa", "hellaswag", "openbookqa", "headqa")
TASKS: dict[str, Task] = {
    **{name: Task(name, f"zeroshot/{name}.jsonl", "multiple_choice") for name in PAPER_TASKS},
    **{name: Task(name, f"zeroshot-extra/{name}.jsonl", "multiple_choice")
       for name in ("arc_easy_test", "arc_challenge_test", "openbookqa_test", "copa")},
    "lambada_openai": Task("lambada_openai", "zeroshot-extra/lambada_openai.jsonl", "lambada"),
}
GROUPS: dict[str, tuple[str, ...]] = {
    "paper": PAPER_TASKS,
    "extra": ("arc_easy_test", "arc_challenge_test", "openbookqa_test", "copa", "lambada_openai"),
}
FIELDS = {"multiple_choice": ("prompt", "choices", "answer"), "lambada": ("context", "continuation")}


def resolve_tasks(names: list[str] | str) -> list[Task]:
    """Task names (or group names ``paper``, ``extra``; comma-separated string or list) -> tasks, in order."""
    if isinstance(names, str):
        names = [n for n in names.split(",") if n.strip()]
    tasks: list[Task] = []
    for name in (n.strip() for n in names):
        if name in GROUPS:
            tasks.extend(TASKS[n] for n in GROUPS[name])
        elif name in TASKS:
            tasks.append(TASKS[name])
        else:
            raise UserError(f"unknown task {name!r}; known tasks: {', '.join(TASKS)}; groups: {', '.join(GROUPS)}")
    return list(dict.fromkeys(tasks))


def read_task(task: Task, data_dir: str | Path | None = None, limit: int | None = None) -> list[dict]:
    """The items of ``task`` (the first ``limit`` if given), each checked against the task's schema."""
    path = Path(data_dir or default_data_dir()) / task.path
    if not path.is_file():
        raise UserError(f"task file {path} not found (task {task.name!r}); set --data-dir or $BISPIKCLM_DATA")
    items = []
    with path.open(encoding="utf-8") as handle:
        for lineno, line in enumerate(handle, start=1):
            if limit is not None and len(items) >= limit:
                break
            if not line.strip():
                continue
            items.append(_parse_item(line, task, path, lineno))
    if not items:
        raise UserError(f"task file {path} has no items")
    return items


def _parse_item(line: str, task: Task, path: Path, lineno: int) -> dict:
    where = f"{path}:{lineno}"
    try:
        item = json.loads(line)
    except json.JSONDecodeError as err:
        raise UserError(f"{where}: malformed JSON line ({err.msg}: column {err.colno})") from None
    if not isinstance(item, dict):
        raise UserError(f"{where}: expected a JSON object, got {type(item).__name__}")
    missing = [field for field in FIELDS[task.kind] if field not in item]
    if missing:
        raise UserError(f"{where}: missing field(s) {missing} for a {task.kind} task")
    if task.kind == "multiple_choice":
        choices, answer = item["choices"], item["answer"]
        if not (isinstance(choices, list) and len(choices) >= 2 and all(isinstance(c, str) for c in choices)):
            raise UserError(f"{where}: 'choices' must be a list of at least two strings")
        if not (isinstance(answer, int) and 0 <= answer < len(choices)):
            raise UserError(f"{where}: 'answer' must be an index into 'choices', got {answer!r}")
    return item

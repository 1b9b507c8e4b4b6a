"""``python -m bispikclm.evaluation.lm_eval_cli [lm_eval arguments]``: lm-eval's own command line, with the
``bispikclm`` model registered and our task folder on ``--include_path``.

Example (offline)::

    HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 python -m bispikclm.evaluation.lm_eval_cli \\
        --model bispikclm --model_args pretrained=runs/quickstart/student --tasks bispikclm_paper
"""

from __future__ import annotations

import os
import sys

from lm_eval.__main__ import cli_evaluate

from . import lm_eval_adapter


def main(argv: list[str] | None = None) -> int:
    """Run lm-eval with ``argv`` (default: this process's arguments)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--include_path" not in argv:
        argv += ["--include_path", str(lm_eval_adapter.TASKS_DIR)]
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    sys.argv = ["lm_eval", *argv]
    cli_evaluate()
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""``bispikclm <command>``: one entry point, one module per command in :mod:`bispikclm.commands`.

Each command module defines ``add_arguments(parser)`` and ``run(args) -> int``, and imports at its top only what
its arguments need (the standard library and light modules such as :mod:`bispikclm.errors`); everything a run needs
(torch, transformers, matplotlib, accelerate) is imported inside ``run``. Only the command on the command line is
imported, so ``bispikclm --help``, ``bispikclm CMD --help`` and argument errors return before torch loads.

Errors a user can fix raise :class:`bispikclm.errors.UserError`; they are printed as one line and exit with code 2.
A run stopped by SIGTERM or SIGINT after its checkpoint (:class:`bispikclm.runfolder.Interrupted`) prints one line
and exits with 128 + the signal's number (143, 130). The run-folder locks a command took are released when it ends.
"""

from __future__ import annotations

import argparse
import importlib
import signal
import sys

from .errors import UserError
from .runfolder import Interrupted, release_held

COMMANDS = {
    "quickstart": "Train a small teacher on WikiText-2, distill a student with SpAD, evaluate, report cost",
    "train": "Distill (or train) a BiSpikCLM student from a YAML recipe",
    "eval": "Evaluate: perplexity, zero-shot tasks, threshold x time-step sweeps",
    "audit": "List every non-spiking operation on the inference path (exit 1 if the blocks have any)",
    "energy": "Count operations on real text and estimate energy against the ANN",
    "report": "Write firing-pattern pictures and an HTML report for a run folder",
    "generate": "Generate text from a checkpoint (PyTorch model or the packed engine)",
}


def build_parser(commands: tuple[str, ...] | list[str] | None = None) -> argparse.ArgumentParser:
    """The parser of every command; with ``commands``, only those get their arguments (only their modules are
    imported), the others are listed in ``--help`` without arguments."""
    parser = argparse.ArgumentParser(prog="bispikclm", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for name, help_text in COMMANDS.items():
        command = sub.add_parser(name, help=help_text, description=help_text)
        if commands is None or name in commands:
            module = importlib.import_module(f"bispikclm.commands.{name}")
            module.add_arguments(command)
            command.set_defaults(_run=module.run)
    return parser


def requested_command(argv: list[str]) -> list[str]:
    """The command named on the command line (the first argument that is not an option; the top-level parser has
    no option that takes a value), as a list of zero or one name."""
    first = next((arg for arg in argv if not arg.startswith("-")), None)
    return [first] if first in COMMANDS else []


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser(requested_command(argv)).parse_args(argv)
    try:
        return int(args._run(args) or 0)
    except UserError as err:
        print(f"bispikclm {args.command}: error: {err}", file=sys.stderr)
        return 2
    except Interrupted as stop:
        how = ("; run the same command with --resume to continue" if hasattr(args, "resume")
               else "; this command does not resume: run it again with another --out")
        print(f"bispikclm {args.command}: {stop}{how}", file=sys.stderr)
        return stop.exit_code
    except KeyboardInterrupt:       # Ctrl-C outside a run, or a second one inside: no checkpoint of this moment
        how = "; the last complete checkpoint is intact (--resume continues from it)" if hasattr(args, "resume") else ""
        print(f"bispikclm {args.command}: interrupted{how}", file=sys.stderr)
        return 128 + signal.SIGINT
    finally:
        release_held()


if __name__ == "__main__":
    sys.exit(main())

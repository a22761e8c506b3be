"""`phasewatch` — the trainer CLI: synth, validate, train, export, bench.

Each subcommand lives in its own module with ``add_<name>_arguments`` and ``cli_<name>``;
they are imported only when used, so ``phasewatch validate`` never pays for torch.

Errors: library code raises ``trainer.errors.TrainerError`` (never ``SystemExit``); this is
the one place that turns one into an exit: one line on stderr naming the file and the fix,
exit code ``e.exit_code`` (2; 1 for a refused export), the traceback only with ``--debug``.
"""

from __future__ import annotations

import argparse
import importlib
import sys
import traceback
from typing import NoReturn

from trainer.errors import TrainerError

# subcommand -> (module, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "synth": ("trainer.synth", "write a synthetic receiver store (SPEC section 3)"),
    "validate": ("trainer.validate", "validate every archive of a store and write the acceptance index"),
    "train": ("trainer.train", "extract windows and train every model for both threat models"),
    "export": ("trainer.export", "export a training run to an ONNX models directory for the edge"),
    "bench": ("trainer.bench", "latency benchmark of an exported models directory (model_perf points)"),
    "cache": (
        "trainer.windowstore",
        "the window store: `cache build` extracts now, `cache gc` deletes stale shards",
    ),
}


class _OneLineParser(argparse.ArgumentParser):
    """A bad flag is one line naming the fix (not argparse's usage block); subcommands inherit it."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: {message} (see {self.prog} --help)\n")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    # Only the chosen subcommand's module is imported to build its arguments.
    parser = _OneLineParser(prog="phasewatch", description=__doc__.splitlines()[0])
    parser.add_argument("--debug", action="store_true", help="show the traceback of an error")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    chosen = next((a for a in argv if not a.startswith("-")), None)
    chosen = chosen if chosen in COMMANDS else None
    for name, (module, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        if name == chosen:
            getattr(importlib.import_module(module), f"add_{name}_arguments")(p)
    args = parser.parse_args(argv)
    module = importlib.import_module(COMMANDS[args.command][0])
    try:
        return int(getattr(module, f"cli_{args.command}")(args) or 0)
    except TrainerError as e:
        if args.debug:
            traceback.print_exc()
        print(f"phasewatch {args.command}: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("phasewatch: interrupted", file=sys.stderr)
        return 130
    except OSError as e:  # a full disk, a file this user may not read: one line naming it
        if args.debug:
            traceback.print_exc()
        print(f"phasewatch {args.command}: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    raise SystemExit(main())

"""Typed errors of the library, and the one place that turns them into a clean exit.

Library code raises these with a single-line message that names the param or file, what is wrong and the fix.
Only the entry points (stage scripts, the benchmark) end the process: `run_stage` prints the message, no traceback,
and exits with status 1.
"""
import argparse
import logging
import os
import sys
from pathlib import Path


class NLIError(Exception):
    """Base class: the message is one line, ready to show to the user as it is."""


class ParamsError(NLIError):
    """A value in params.yaml (or given as a param) is missing, of the wrong type, out of range or inconsistent."""


class DataError(NLIError):
    """Raw data (data.source, NLI_DATA_MIRROR) is missing, unreachable or malformed."""


class ArtifactError(DataError):
    """An output of an earlier stage (data/, predictions/, metrics/, models/) is missing or malformed."""


class ModelLoadError(NLIError):
    """The model, tokenizer or adapter cannot be loaded."""


class CheckpointError(NLIError):
    """A saved checkpoint cannot be (safely) restored."""


class OutputError(NLIError):
    """An output cannot be written: permission denied, disk full, or its path holds the other kind (file/directory)."""


class RunError(NLIError):
    """The run itself failed in a way the user can fix by a param (out of GPU memory, say)."""


def run_stage(main, *args, log_format="%(asctime)s %(name)s: %(message)s"):
    """Entry point of a stage script: logging on, `main(*args)`, and a library error as one line with exit status 1."""
    logging.basicConfig(level=logging.INFO, format=log_format)
    try:
        main(*args)
    except NLIError as e:
        exit_with(str(e))


# Set by distributed.launch for the ranks it starts: the directory where each rank leaves its one line, which the
# launcher prints once for all ranks (instead of once per rank, under torchrun's traceback).
RANK_LINES = "QLORA_NLI_RANK_LINES"


def exit_with(message, status=1):
    """End the process with `message` as its one line on stderr and exit `status` (a rank of distributed.launch
    leaves the line to its launcher instead)."""
    directory, rank = os.environ.get(RANK_LINES), os.environ.get("RANK")
    if directory and rank is not None:
        try:
            Path(directory, f"rank-{int(rank)}").write_text(message, encoding="utf-8")
            sys.exit(status)
        except (OSError, ValueError):
            pass  # printed here after all
    if status == 1:
        sys.exit(message)  # Python prints it to stderr and exits 1
    print(message, file=sys.stderr, flush=True)
    sys.exit(status)


class ArgumentParser(argparse.ArgumentParser):
    """argparse as every entry point uses it: `--help` prints the usage and the description as written (exit status
    0); an unknown option, an extra or missing argument is one line, `<prog>: <what is wrong>; see <prog> --help`, with
    exit status 2, before the command reads or writes anything."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", argparse.RawDescriptionHelpFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message):
        self.exit(2, f"{self.prog}: {message}; see {self.prog} --help\n")


def stage_arguments(doc, argv=None, **positionals):
    """The command line of the stage script being run (its `__main__` module), described by its docstring `doc`:
    `positionals` maps each positional argument's name to its allowed values; nothing else is accepted."""
    spec = getattr(sys.modules["__main__"], "__spec__", None)
    prog = f"python -m {spec.name}" if spec is not None and spec.name else f"python {sys.argv[0]}"
    parser = ArgumentParser(prog=prog, description=doc)
    for name, choices in positionals.items():
        parser.add_argument(name, choices=choices, help=f"one of {', '.join(choices)}")
    return parser.parse_args(argv)

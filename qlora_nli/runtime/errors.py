"""Typed errors of the library, and the one place that turns them into a clean exit.

Library code raises these with a single-line message that names the param or file, what is wrong and the fix.
Only the entry points (stage scripts, the benchmark) end the process: `run_stage` prints the message, no traceback,
and exits with status 1 (130 after Ctrl-C).
"""
import argparse
import builtins
import logging
import os
import reprlib
import sys
from pathlib import Path

MESSAGE_CHARS = 1000  # the longest line shown: a value or path in it never floods the terminal
MAX_LINES = 20  # the most problems one error lists (params.yaml checks report every bad value at once)


class NLIError(Exception):
    """Base class: the message is one line per problem, ready to show to the user as it is (cut to MESSAGE_CHARS)."""

    def __init__(self, message=""):
        lines = [line if len(line) <= MESSAGE_CHARS else line[:MESSAGE_CHARS - 3] + "..."
                 for line in str(message).split("\n")]
        if len(lines) > MAX_LINES:
            lines = lines[:MAX_LINES - 1] + [f"... and {len(lines) - MAX_LINES + 1} more problems of the same kind"]
        super().__init__("\n".join(lines))


class _Bounded(reprlib.Repr):
    """repr that stops early: a few items per list or mapping, a few levels deep, the start of a long string. A value
    that shares or nests itself (a YAML alias) costs as much as its first few items, not its expanded size."""

    def __init__(self):
        super().__init__()
        self.maxlevel, self.maxlist, self.maxtuple, self.maxdict, self.maxset = 3, 6, 6, 6, 6
        self.maxstring = self.maxother = 200

    def repr_str(self, x, level):
        return builtins.repr(x[:self.maxstring + 1])  # the closing quote of a long string is cut by `show`

    def repr_int(self, x, level):
        try:
            return builtins.repr(x)
        except ValueError:  # more digits than Python converts (sys.set_int_max_str_digits)
            return f"<an integer of {x.bit_length()} bits>"


_BOUNDED = _Bounded()


def shorten(text, limit=80):
    """Text as one line of at most `limit` characters: runs of whitespace (newlines too) become one space, and what
    is longer is cut, ending in "..."."""
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[:limit - 3] + "..."


def show(value, limit=60):
    """A value for a message: its repr (newlines escaped), bounded in time and length (see _Bounded), at most `limit`
    characters. The one helper every message uses to quote a value."""
    text = _BOUNDED.repr(value)
    return text if len(text) <= limit else text[:limit - 3] + "..."


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


# What an interrupted run leaves, said on Ctrl-C: set by the stage (`on_interrupt`), else what qlora_nli.io put in place.
_interrupt_note = []


def on_interrupt(note):
    """On Ctrl-C, `note()` ends the one line `run_stage` prints (e.g. which epoch a rerun resumes from)."""
    _interrupt_note[:] = [note]


def _interrupted_line(name):
    # qlora_nli.io's record of the outputs put in place; not imported here: a process that has not imported it (or
    # was interrupted while importing it) has written none
    committed = getattr(sys.modules.get("qlora_nli.runtime.io"), "COMMITTED", [])
    note = "no output was changed; run it again to finish"
    if committed:
        note = f"{', '.join(map(str, committed))} already written in full, nothing is half-written"
    if _interrupt_note:
        try:
            note = _interrupt_note[0]()
        except Exception:  # a note that cannot be made: the general one
            pass
    return f"{name}: interrupted; {note}"


def _one_line_for_ctrl_c(previous):
    """sys.excepthook for Ctrl-C outside `run_stage` (while an entry point still imports torch, say): the same line
    and status instead of a traceback. Anything else goes to the previous hook."""
    def hook(kind, value, traceback):
        if not issubclass(kind, KeyboardInterrupt):
            return previous(kind, value, traceback)
        print(_interrupted_line(Path(sys.argv[0]).stem or "python"), file=sys.stderr, flush=True)
        sys.stdout.flush()
        os._exit(130)  # as `run_stage` exits; the interpreter would otherwise end itself by the signal
    return hook


sys.excepthook = _one_line_for_ctrl_c(sys.excepthook)


def run_stage(main, *args, log_format="%(asctime)s %(name)s: %(message)s", name=None):
    """Entry point of a stage script: logging on, `main(*args)`, and a library error as one line with exit status 1.
    Ctrl-C (SIGINT) gives one line too, with the shell's status for it, 130; `name` (default: the script's) leads it."""
    logging.basicConfig(level=logging.INFO, format=log_format)
    try:
        main(*args)
    except NLIError as e:
        exit_with(str(e))
    except KeyboardInterrupt:
        exit_with(_interrupted_line(name or Path(sys.argv[0]).stem), 130)


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

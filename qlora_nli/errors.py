"""Typed errors of the library, and the one place that turns them into a clean exit.

Library code raises these with a single-line message that names the param or file, what is wrong and the fix.
Only the entry points (stage scripts, the benchmark) end the process: `run_stage` prints the message, no traceback,
and exits with status 1 (130 after Ctrl-C).
"""
import builtins
import logging
import os
import reprlib
import sys
from pathlib import Path

MESSAGE_CHARS = 1000  # the longest message shown: a value or path in it never floods the terminal


class NLIError(Exception):
    """Base class: the message is one line, ready to show to the user as it is (cut to MESSAGE_CHARS)."""

    def __init__(self, message=""):
        message = str(message)
        super().__init__(message if len(message) <= MESSAGE_CHARS else message[:MESSAGE_CHARS - 3] + "...")


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
    committed = getattr(sys.modules.get("qlora_nli.io"), "COMMITTED", [])
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
        sys.exit(str(e))
    except KeyboardInterrupt:
        print(_interrupted_line(name or Path(sys.argv[0]).stem), file=sys.stderr)
        sys.exit(130)

"""Typed errors of the library, and the one place that turns them into a clean exit.

Library code raises these with a single-line message that names the param or file, what is wrong and the fix.
Only the entry points (stage scripts, the benchmark) end the process: `run_stage` prints the message, no traceback,
and exits with status 1.
"""
import builtins
import logging
import reprlib
import sys

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


def run_stage(main, *args, log_format="%(asctime)s %(name)s: %(message)s"):
    """Entry point of a stage script: logging on, `main(*args)`, and a library error as one line with exit status 1."""
    logging.basicConfig(level=logging.INFO, format=log_format)
    try:
        main(*args)
    except NLIError as e:
        sys.exit(str(e))

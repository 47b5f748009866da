"""Typed errors of the library, and the one place that turns them into a clean exit.

Library code raises these with a single-line message that names the param or file, what is wrong and the fix.
Only the entry points (stage scripts, the benchmark) end the process: `run_stage` prints the message, no traceback,
and exits with status 1.
"""
import logging
import sys


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
        sys.exit(str(e))

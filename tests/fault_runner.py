"""Run a stage with one fault injected at the OS calls an atomic write goes through; the stage as a module
(`-m stages.<name>`, the way dvc.yaml runs it) or as a script.

    NLI_FAULT='{"at": "rename", "path": "metrics/train.json"}' python tests/fault_runner.py -m stages.finetune

or, in every process a command starts (the ranks of a torchrun stage too), with tests/faults/ first on PYTHONPATH
(its sitecustomize.py imports this module): `pipeline.fault_env(root, fault)` gives the environment.

SIGKILLs the process (no cleanup, no finally) at the `nth` (default 1) matching call:
  rename   os.replace / os.rename onto `path`, or qlora_nli.runtime.io.exchange_paths swapping a new directory in: before
           the call (the new version is complete but not in place)
  renamed  the same calls, once the write that made them is over (its temporary folder beside `path` removed): the
           new version is complete and in place, e.g. "checkpoints/epoch-1", a finished checkpoint, then the kill
  moveaway os.replace / os.rename of `path` itself to elsewhere, just after the call (the old version was moved away)
  rmtree   shutil.rmtree of `path`: just after the call (the old version was deleted)
  close    the close of a file opened for writing whose name is the name of `path` (the file it writes to, the
           output itself or a temporary): before the close, so buffered text is not yet on disk
It tests the contract of the writes, not one implementation: whichever way qlora_nli.runtime.io writes, these are the calls
at which a killed run must still leave either the previous or the new complete version.

With "raise": "ENOSPC" (any errno name) the call fails with that OSError instead of the kill, as on a full disk:
  rename   the rename onto `path` or onto a path inside it (a directory output's entries, e.g. checkpoints/epoch-1)
  close    the close of that file (its buffered text then never reaches the disk)
and the stage must end with one line, every output as it was. With "signal": "SIGINT" the process sends itself that
signal just before the call and goes on, as if the user pressed Ctrl-C at that moment.

`python tests/fault_runner.py -m qlora_nli.cli predict ...` runs a module instead of a script.
"""
import builtins
import errno
import io
import json
import os
import runpy
import shutil
import signal
import sys

SPEC = json.loads(os.environ["NLI_FAULT"])
TARGET = os.path.abspath(SPEC["path"])
_calls = 0
_renamed = False  # "renamed": the new version of `path` is in place


def _die(*filenames):
    if "signal" in SPEC:
        os.kill(os.getpid(), getattr(signal, SPEC["signal"]))
        return
    if "raise" in SPEC:
        code = getattr(errno, SPEC["raise"])
        raise OSError(code, os.strerror(code), *filenames)
    os.kill(os.getpid(), signal.SIGKILL)


def _in_dvc():
    """Whether this process is DVC's own (`dvc repro` starting the stages): a fault is for the stages only."""
    spec = getattr(sys.modules.get("__main__"), "__spec__", None)
    return spec is not None and spec.name.split(".")[0] == "dvc"


def _hit(kind, path):
    global _calls
    if _in_dvc():
        return False
    path = os.path.abspath(os.fspath(path))
    inside = "raise" in SPEC and kind == "rename" and path.startswith(TARGET + os.sep)
    if SPEC["at"] != kind or (path != TARGET and not inside):
        return False
    _calls += 1
    return _calls == SPEC.get("nth", 1)


def _renaming(real):
    def rename(src, dst, *args, **kwargs):
        global _renamed
        if _hit("rename", dst):
            _die(os.fspath(src), None, os.fspath(dst))
        moved_away, renamed = _hit("moveaway", src), _hit("renamed", dst)
        result = real(src, dst, *args, **kwargs)
        if moved_away:
            _die()
        _renamed = _renamed or renamed  # "renamed" kills when the write's temporary folder is gone (_removing)
        return result
    return rename


def _removing(real):
    def rmtree(path, *args, **kwargs):
        hit = _hit("rmtree", path)
        name = os.path.basename(os.path.abspath(os.fspath(path)))
        write_over = _renamed and name.startswith(f".{os.path.basename(TARGET)}.tmp-")
        result = real(path, *args, **kwargs)
        if hit or write_over:
            _die()
        return result
    return rmtree


class _KillOnClose:
    """A file object that dies instead of closing."""

    def __init__(self, f):
        self._f = f

    def __getattr__(self, name):
        return getattr(self._f, name)

    def __iter__(self):
        return iter(self._f)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def close(self):
        global _calls
        _calls += 1
        if _calls == SPEC.get("nth", 1):
            if "raise" in SPEC:
                self._f.close()  # no descriptor left open; the error is what the caller sees
            _die()
            if "signal" in SPEC:
                self._f.close()
            return
        self._f.close()


def _opening(real):
    def open_(file, mode="r", *args, **kwargs):
        f = real(file, mode, *args, **kwargs)
        writes = any(c in mode for c in "wax+")
        if (SPEC["at"] == "close" and writes and isinstance(file, (str, os.PathLike)) and not _in_dvc()
                and os.path.basename(os.fspath(file)) == os.path.basename(TARGET)):
            return _KillOnClose(f)
        return f
    return open_


os.replace, os.rename = _renaming(os.replace), _renaming(os.rename)
import qlora_nli.runtime.io  # noqa: E402  (after os is patched; the stage imports the same module object)

qlora_nli.runtime.io.exchange_paths = _renaming(qlora_nli.runtime.io.exchange_paths)
shutil.rmtree = _removing(shutil.rmtree)
builtins.open = io.open = _opening(io.open)

if __name__ == "__main__":
    if sys.argv[1] == "-m":  # as `python -m module` would have it: the working directory first on sys.path
        sys.argv = sys.argv[2:]
        sys.path[0] = os.getcwd()
        runpy.run_module(sys.argv[0], run_name="__main__", alter_sys=True)
    else:
        sys.argv = sys.argv[1:]
        script = sys.argv[0]
        sys.path[0] = os.path.dirname(os.path.abspath(script))  # as `python stages/x.py` would have it
        runpy.run_path(script, run_name="__main__")

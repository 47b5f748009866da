"""Atomic writes: a stage killed at any moment never leaves a truncated output for DVC to record.

Who owns which shared location (the rule every writer here follows):
  - Outputs of a workspace (data/, models/, checkpoints/, metrics/, predictions/, dvclive/, reports/): the one stage
    process that declares them. DVC's repository lock keeps two `dvc repro` of one workspace from running a stage at
    the same time, `dvc exp run --queue` runs each experiment in its own copy of the workspace, and with several
    ranks one process per node writes (its local rank 0, in that node's own checkout). So each output has a single
    writer, and `atomic_path` needs no lock for them.
  - Temporary siblings `.<name>.tmp-<pid>@<host>-<random>`: the process with that pid on that host. Another process
    deletes one only once that pid is gone on this host (`_is_stale`); it never touches a live one, nor one made on
    another host (a shared file system) or by an older version of this code (names it cannot read).
  - The per-user model cache (modeling._cache_dir): every run of the user on the machine reads it; a directory there
    is created once by whichever process first holds its lock (`build_once`), and is never replaced afterwards.
"""
import contextlib
import errno
import os
import re
import shutil
import socket
import tempfile
from pathlib import Path

from qlora_nli.runtime.errors import OutputError

_TMP_MARK = ".tmp-"


def _host():
    return re.sub(r"[^A-Za-z0-9.-]", "_", socket.gethostname()) or "localhost"


def _pid_alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by another user
        return True
    return True


def _is_stale(temporary, prefix):
    """True only for a temporary made on this host by a process that no longer exists."""
    owner, _, _random = temporary.name[len(prefix):].rpartition("-")
    pid, _, host = owner.partition("@")
    return pid.isdigit() and host == _host() and not _pid_alive(int(pid))


def _remove_stale_temporaries(path):
    prefix = f".{path.name}{_TMP_MARK}"
    for sibling in path.parent.iterdir():
        if sibling.name.startswith(prefix) and _is_stale(sibling, prefix):
            shutil.rmtree(sibling, ignore_errors=True)


def _write_error(path, error, workdir=None, outputs=(), undone=()):
    """An OSError while writing `path` as one line: the path, the cause, the fix. A file inside our own temporary
    `workdir` (or any open transaction's staging folder) is not named: it is gone by the time the user reads the line.
    A path inside a staging folder stands for its output; `outputs` are the others written with it (all of them when
    `path` is None: the error does not say which one failed); `undone` those that could not be put back."""
    if path is not None:
        output, folder = _output_of(path)
        if folder is not None:
            path, workdir, outputs = output, folder, _STAGING[folder][1]
    cause = error.strerror or type(error).__name__
    where = Path(error.filename) if isinstance(error.filename, (str, os.PathLike)) else None
    ours = where and (where == path or (workdir is not None and where.is_relative_to(workdir))
                      or _output_of(where)[1] is not None)
    where = "" if not where or ours else f" at {where}"
    near = Path(path if path is not None else outputs[0])
    if error.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
        fix = "free disk space (or raise the quota) on that file system, then rerun"
    elif error.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        fix = f"make {near.parent} writable by this user, then rerun"
    else:
        fix = f"check that every folder on the way to {near} is a writable directory, then rerun"
    if path is None:
        return OutputError(f"{', '.join(map(str, outputs))}: cannot write them ({cause}{where}); none of them was "
                           f"changed; {fix}")
    others = [o for o in outputs if Path(o) != Path(path)]
    if undone:
        changed = (f"{', '.join(map(str, undone))} could not be put back and are new, the other outputs written with "
                   f"it are as they were")
    else:
        changed = "nothing was changed there" + (f", nor in the {len(others)} other outputs written with it"
                                                 if len(others) > 1 else f", nor in {others[0]}" if others else "")
    return OutputError(f"{path}: cannot write it ({cause}{where}); {changed}; {fix}")


def exchange_paths(a, b):
    """Swap two existing paths in one step (Linux renameat2 with RENAME_EXCHANGE): a directory output is replaced
    without an instant in which it is missing, and the old one ends up at `a`, deleted with the temporary. False where
    the C library or the file system cannot, so that the caller falls back to two renames."""
    import ctypes

    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):  # not Linux, or a C library without renameat2
        return False
    at_fdcwd, rename_exchange = -100, 2
    if renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):  # a file system without the flag
        return False
    raise OSError(code, os.strerror(code), os.fspath(b))


def _kind_of(path):
    return "a directory" if path.is_dir() else "a file"


# Staging folders of the transactions now open in this process: {staging folder: (the output it stands for, all the
# outputs of its transaction)}, so that
# a failing write inside one (which may itself go through a nested atomic write) names the output, not the folder.
_STAGING = {}
# The outputs this process has put in place (for the line of an interrupted stage).
COMMITTED = []


def _output_of(path):
    """(output, staging folder) of a path inside an open transaction's staging folder, else (path, None)."""
    absolute = Path(os.path.abspath(path))
    for staging, (output, _) in _STAGING.items():
        if absolute.is_relative_to(os.path.abspath(staging)):
            return output, staging
    return Path(path), None


def _staging_folder(path):
    """A new, empty temporary folder beside `path` (same file system, so renames need no copy); stale ones of dead
    processes go first."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        _remove_stale_temporaries(path)
        return Path(tempfile.mkdtemp(prefix=f".{path.name}{_TMP_MARK}{os.getpid()}@{_host()}-", dir=path.parent))
    except OSError as e:
        raise _write_error(path, e) from None


@contextlib.contextmanager
def _interrupts_deferred():
    """Ctrl-C (SIGINT) waits until the block is over, then goes to the handler there was (Python's raises
    KeyboardInterrupt): the swaps of a transaction are never cut half-way. Only the main thread can set a handler;
    elsewhere the block runs as it is."""
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        yield
        return
    received = []
    previous = signal.signal(signal.SIGINT, lambda signum, frame: received.append(frame))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
    if received and callable(previous):  # Python's own handler raises KeyboardInterrupt
        previous(signal.SIGINT, received[0])
    elif received and previous == signal.SIG_DFL:
        os.kill(os.getpid(), signal.SIGINT)


def _swap_in(new, path, aside):
    """Put `new` at `path`; returns how, for `_swap_back`. The previous version (if any) is kept, at `new` after an
    exchange or at `aside` otherwise, until the transaction ends."""
    if not (path.exists() or path.is_symlink()):
        os.rename(new, path)
        return "added"
    if exchange_paths(new, path):
        return "exchanged"
    # Where the system cannot swap in one step. A file: the old one stays linked at `aside`, and the replace is
    # atomic. A directory: two renames, nothing copied or deleted between them, so the old one is gone from `path`
    # only for that instant.
    if new.is_dir():
        os.rename(path, aside)
    else:
        try:
            os.link(path, aside)
        except OSError:  # a file system without hard links
            shutil.copy2(path, aside)
    try:
        os.replace(new, path)
    except OSError:
        if new.is_dir():
            os.rename(aside, path)
        raise
    return "aside"


def _swap_back(new, path, aside, how):
    """Undo `_swap_in`: the previous version back at `path` (none if there was none)."""
    if how == "added":
        os.rename(path, new)
    elif how == "exchanged":
        if not exchange_paths(new, path):
            raise OSError(errno.EOPNOTSUPP, "cannot swap back", os.fspath(path))
    elif not path.is_dir():
        os.replace(aside, path)
    else:
        os.rename(path, new)
        os.rename(aside, path)


@contextlib.contextmanager
def all_or_none(paths):
    """A transaction over a stage's outputs (files or directories). Yields {path: staging path}: write each output to
    its staging path (a temporary sibling, the writers below may be used there). When the block ends without error
    every output is swapped in; if one swap fails, those already made are undone, so every output is new or every
    output is as it was, never a mix. After an error in the block (a full disk, no permission, Ctrl-C) none is
    touched. The swaps are renames, which need no new space, and Ctrl-C waits until they are all done (or undone).

    An OSError becomes one OutputError line naming the output, the cause and the fix. An output that exists as the
    other kind (a directory where a file is written, or the reverse) is refused the same way, before any swap. One
    writer per output at a time (see the module docstring); concurrent writers of one directory go through
    `build_once`. A process killed (SIGKILL) between two swaps leaves each output complete, old or new."""
    given = list(paths)
    outputs = [Path(p) for p in given]
    if len(set(outputs)) != len(outputs):
        raise ValueError(f"all_or_none: an output is listed twice: {given}")
    folders = {}
    try:
        for path in outputs:
            folders[path] = _staging_folder(path)
            _STAGING[folders[path]] = (path, tuple(outputs))
        staged = {p: folders[path] / path.name for p, path in zip(given, outputs)}
        try:
            yield staged
        except OSError as e:
            where = e.filename if isinstance(e.filename, (str, os.PathLike)) else None
            output = _output_of(where)[0] if where and _output_of(where)[1] else None
            if output is None:
                raise _write_error(outputs[0] if len(outputs) == 1 else None, e, outputs=outputs) from None
            raise _write_error(output, e, folders[output], outputs) from None
        for path in outputs:  # everything checked before the first swap
            new = folders[path] / path.name
            if not (new.exists() or new.is_symlink()):
                raise RuntimeError(f"all_or_none({path}): the caller wrote nothing to {new}")
            if (path.exists() or path.is_symlink()) and new.is_dir() != path.is_dir():
                raise OutputError(f"{path}: exists as {_kind_of(path)}, but this output is {_kind_of(new)}; left it "
                                  f"untouched{'' if len(outputs) == 1 else ', and the other outputs too'}; move or "
                                  f"delete {path} yourself, then rerun")
        done = []
        with _interrupts_deferred():
            for path in outputs:
                new, aside = folders[path] / path.name, folders[path] / "replaced"
                try:
                    done.append((new, path, aside, _swap_in(new, path, aside)))
                except BaseException as e:
                    undone = _undo(done)
                    if isinstance(e, OSError):
                        raise _write_error(path, e, folders[path], outputs, undone) from None
                    raise
            # before a deferred Ctrl-C is raised; not a nested write into a staging folder
            COMMITTED.extend(o for o in outputs if _output_of(o)[1] is None)
    finally:
        for folder in folders.values():
            _STAGING.pop(folder, None)
            shutil.rmtree(folder, ignore_errors=True)


def _undo(done):
    """Swap back the outputs in `done`, the last first; returns the outputs that could not be put back."""
    stuck = []
    for new, path, aside, how in reversed(done):
        try:
            _swap_back(new, path, aside, how)
        except OSError:
            stuck.append(path)
    return stuck


@contextlib.contextmanager
def atomic_path(path):
    """Yield a temporary sibling path; on success it is renamed over `path` (a file or a directory): `all_or_none` of
    one output."""
    with all_or_none([path]) as staged:
        yield next(iter(staged.values()))

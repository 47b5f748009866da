"""Atomic writes: a stage killed at any moment never leaves a truncated output for DVC to record.

Who owns which shared location (the rule every writer here follows):
  - Outputs of a workspace (data/, models/, checkpoints/, metrics/, predictions/, dvclive/, reports/): the one stage
    process that declares them. DVC's repository lock keeps two `dvc repro` of one workspace from running a stage at
    the same time, `dvc exp run --queue` runs each experiment in its own copy of the workspace, and with several
    ranks only rank 0 writes. So each output has a single writer, and `atomic_path` needs no lock for them.
  - Temporary siblings `.<name>.tmp-<pid>@<host>-<random>`: the process with that pid on that host. Another process
    deletes one only once that pid is gone on this host (`_is_stale`); it never touches a live one, nor one made on
    another host (a shared file system) or by an older version of this code (names it cannot read).
  - The per-user model cache (modeling._cache_dir): every run of the user on the machine reads it; a directory there
    is created once by whichever process first holds its lock (`build_once`), and is never replaced afterwards.
"""
import contextlib
import errno
import hashlib
import json
import os
import re
import shutil
import socket
import tempfile
from pathlib import Path

from qlora_nli.errors import OutputError

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


def _write_error(path, error, workdir=None):
    """An OSError while writing `path` as one line: the path, the cause, the fix. A file inside our own temporary
    `workdir` is not named: it is gone by the time the user reads the line."""
    cause = error.strerror or type(error).__name__
    where = Path(error.filename) if isinstance(error.filename, (str, os.PathLike)) else None
    ours = where and (where == path or (workdir is not None and where.is_relative_to(workdir)))
    where = "" if not where or ours else f" at {where}"
    if error.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
        fix = "free disk space (or raise the quota) on that file system, then rerun"
    elif error.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        fix = f"make {path.parent} writable by this user, then rerun"
    else:
        fix = f"check that every folder on the way to {path} is a writable directory, then rerun"
    return OutputError(f"{path}: cannot write it ({cause}{where}); nothing was changed there; {fix}")


def _kind(path):
    return "a directory" if path.is_dir() else "a file"


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


@contextlib.contextmanager
def atomic_path(path):
    """Yield a temporary sibling path; on success it is renamed over `path` (a file or a directory).

    A failure leaves `path` as it was and removes the temporary: an OSError (permission, full disk) becomes one
    OutputError line naming the path and the cause. `path` existing as the other kind (a directory where a file is
    written, or the reverse) is refused the same way, untouched. One writer per `path` at a time (see the module
    docstring); concurrent writers of one directory go through `build_once`."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        _remove_stale_temporaries(path)
        workdir = Path(tempfile.mkdtemp(prefix=f".{path.name}{_TMP_MARK}{os.getpid()}@{_host()}-", dir=path.parent))
    except OSError as e:
        raise _write_error(path, e) from None
    tmp = workdir / path.name
    try:
        try:
            yield tmp
        except OSError as e:
            raise _write_error(path, e, workdir) from None
        if not (tmp.exists() or tmp.is_symlink()):
            raise RuntimeError(f"atomic_path({path}): the caller wrote nothing to {tmp}")
        exists = path.exists() or path.is_symlink()
        if exists and tmp.is_dir() != path.is_dir():
            raise OutputError(f"{path}: exists as {_kind(path)}, but this output is {_kind(tmp)}; left it untouched; "
                              f"move or delete {path} yourself, then rerun")
        aside = workdir / "replaced"
        try:
            if exists and tmp.is_dir() and not exchange_paths(tmp, path):
                # Where the system cannot swap two directories in one step: two renames, nothing copied or deleted
                # between them, so the old directory is gone from `path` only for that instant.
                os.rename(path, aside)
                os.replace(tmp, path)
            elif not (exists and tmp.is_dir()):
                os.replace(tmp, path)
        except OSError as e:
            if aside.exists() and not path.exists():
                os.rename(aside, path)  # put the old directory back: a failed write changes nothing
            raise _write_error(path, e, workdir) from None
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


@contextlib.contextmanager
def exclusive_lock(lock_file):
    """Hold an exclusive lock on `lock_file` (created if missing, never deleted: deleting it would let two processes
    lock two different files). The kernel releases it when the process ends, killed or not."""
    import fcntl  # POSIX only: imported here so that the rest of this module loads on any system

    lock_file = Path(lock_file)
    try:
        lock_file.parent.mkdir(parents=True, exist_ok=True)
        handle = open(lock_file, "a")
    except OSError as e:
        raise _write_error(lock_file, e) from None
    with handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def build_once(directory, build, complete="config.json"):
    """Create `directory` by `build(tmp)` unless it already holds `complete`; safe for many processes at once.

    Readers that find `complete` use the directory without locking: it appears by one rename, whole, and is never
    replaced. Processes that find it missing queue on `.<name>.lock`; the first builds, the others then find it."""
    directory = Path(directory)
    if (directory / complete).exists():
        return directory
    with exclusive_lock(directory.parent / f".{directory.name}.lock"):
        if not (directory / complete).exists():
            with atomic_path(directory) as tmp:
                build(tmp)
    return directory


def write_text(path, text):
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def write_json(path, obj):
    write_text(path, json.dumps(obj, indent=2, sort_keys=False, allow_nan=False) + "\n")


def write_jsonl(path, rows):
    write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))


def read_json(path):
    return json.loads(Path(path).read_text())


def read_jsonl(path):
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def file_sha256(path):
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def tree_size_bytes(path):
    path = Path(path)
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


@contextlib.contextmanager
def all_or_none(paths):
    """Yield {path: staging path} for a set of outputs; write each to its staging path with the usual writers. When
    the block ends without error all of them are renamed into place, after an error none is: a write that fails
    half-way (full disk, no permission) leaves every old file as it was. The renames only update directory
    entries, which need no new space."""
    with contextlib.ExitStack() as stack:
        yield {path: stack.enter_context(atomic_path(path)) for path in paths}

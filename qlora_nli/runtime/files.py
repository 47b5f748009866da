"""Small file helpers: JSON and text writes through `runtime.io.atomic_path`, hashes, sizes, and the
lock that builds a shared cache directory once."""
import contextlib
import hashlib
import json
from pathlib import Path

from qlora_nli.runtime.io import _write_error, atomic_path


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


def file_on_the_way(path):
    """The existing file that stands where a directory on the way to `path` must be (a/b below a file a), or None:
    what makes writing `path` fail, known before any work is done."""
    above = next(p for p in Path(path).absolute().parents if p.exists())  # the root exists
    return None if above.is_dir() else above


def write_text(path, text):
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def write_json(path, obj):
    write_text(path, json.dumps(obj, indent=2, sort_keys=False, allow_nan=False) + "\n")


def write_jsonl(path, rows):
    write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))


def file_sha256(path):
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def tree_size_bytes(path):
    path = Path(path)
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())

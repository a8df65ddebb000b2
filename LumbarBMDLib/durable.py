"""Output that survives two writers, a full disk and a ``kill -9``: folders and files appear complete or not at all.

- :func:`atomic_folder` fills a hidden temporary sibling (``.<name>.tmp-XXXXXX``) and puts it in place in one
  step: where ``<name>`` already exists, the two are *exchanged* (Linux ``renameat2(RENAME_EXCHANGE)``), so a
  reader sees the old folder or the new one, never neither; the old one is then deleted.
- :func:`case_lock` serialises the writers of one case across processes (``fcntl.flock`` on
  ``DIR/.lumbarbmd-locks/<name>.lock``; the kernel releases it when a process dies, even by ``kill -9``).
- :func:`clean_stale_temporaries` removes the temporary folders of writers that died (their lock is free).
- :func:`atomic_write_text` writes a file through a temporary sibling, ``fsync`` and rename.
- Everything created follows the user's umask (``tempfile`` would make folders 0700 and files 0600).
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import errno
import fcntl
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from LumbarBMDLib.errors import LumbarBMDError

LOCK_FOLDER = ".lumbarbmd-locks"
TMP_MARK = ".tmp-"  # temporary folders are ``.<name>.tmp-XXXXXX``: hidden, and told apart from a case's own name
_RENAME_EXCHANGE = 2  # linux/fs.h
_AT_FDCWD = -100


def current_umask() -> int:
    """The process's umask (read without changing it for longer than this call)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _apply_umask(path: Path, directory: bool) -> None:
    os.chmod(path, (0o777 if directory else 0o666) & ~current_umask())


def _libc_renameat2():
    name = ctypes.util.find_library("c")
    if not name:
        return None
    try:
        fn = ctypes.CDLL(name, use_errno=True).renameat2
    except (OSError, AttributeError):  # not glibc ≥ 2.28 (or not Linux)
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    fn.restype = ctypes.c_int
    return fn


_RENAMEAT2 = _libc_renameat2()


def exchange(a: Path, b: Path) -> bool:
    """Swap two existing paths atomically; False where the system cannot (then nothing was changed)."""
    if _RENAMEAT2 is None:
        return False
    if _RENAMEAT2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):  # file system without RENAME_EXCHANGE
        return False
    raise OSError(err, os.strerror(err), str(b))


def publish_folder(tmp: Path, final: Path) -> None:
    """Put the complete folder ``tmp`` in place of ``final`` (which may exist) without a moment where ``final``
    is absent (where the system can exchange); the previous ``final`` is deleted."""
    if final.is_symlink() or (final.exists() and not final.is_dir()):
        raise LumbarBMDError(f"cannot write {final}: it exists and is not a folder (a file or a symbolic link); "
                             "move it away or choose another output folder")
    for _ in range(3):
        if final.exists():
            if exchange(tmp, final):
                shutil.rmtree(tmp, ignore_errors=True)  # ``tmp`` now holds the previous folder
                return
            old = final.with_name(f".{final.name}{TMP_MARK}old-{os.getpid()}")
            os.replace(final, old)  # no exchange available: a short window where ``final`` is absent
            os.replace(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
            return
        try:
            os.rename(tmp, final)  # fails if another writer created ``final`` in between
            return
        except OSError as err:
            if err.errno not in (errno.EEXIST, errno.ENOTEMPTY):
                raise
    raise LumbarBMDError(f"could not put {final} in place: another process keeps replacing it")


@contextlib.contextmanager
def atomic_folder(final: str | Path) -> Iterator[Path]:
    """A temporary sibling folder to fill; when the block ends normally it takes the place of ``final``, when it
    raises it is removed: ``final`` is always either its previous complete content or the new one."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}{TMP_MARK}", dir=final.parent))
    try:
        _apply_umask(tmp, directory=True)
        yield tmp
        for p in tmp.rglob("*"):
            _apply_umask(p, directory=p.is_dir())
        publish_folder(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


@contextlib.contextmanager
def case_lock(out_dir: str | Path, name: str, blocking: bool = True) -> Iterator[bool]:
    """Hold the lock of case ``name`` in ``out_dir`` for the block; yields False (without waiting) when
    ``blocking`` is False and another process holds it."""
    folder = Path(out_dir) / LOCK_FOLDER
    folder.mkdir(parents=True, exist_ok=True)
    fd = os.open(folder / f"{name}.lock", os.O_RDWR | os.O_CREAT, 0o666 & ~current_umask())
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | (0 if blocking else fcntl.LOCK_NB))
        except BlockingIOError:
            yield False
            return
        yield True
    finally:
        os.close(fd)  # closing releases the lock


def clean_stale_temporaries(out_dir: str | Path) -> list[Path]:
    """Remove the temporary folders (``.<name>.tmp-*``) left in ``out_dir`` by writers that died; a writer still
    at work holds its case's lock and keeps its folder. Returns what was removed."""
    out_dir = Path(out_dir)
    removed = []
    if not out_dir.is_dir():
        return removed
    for p in out_dir.iterdir():
        if not (p.name.startswith(".") and TMP_MARK in p.name and p.is_dir() and not p.is_symlink()):
            continue
        name = p.name[1:].rsplit(TMP_MARK, 1)[0]
        with case_lock(out_dir, name, blocking=False) as free:
            if free and p.exists():
                shutil.rmtree(p, ignore_errors=True)
                removed.append(p)
    return removed


def atomic_write_text(path: str | Path, text: str) -> Path:
    """Write ``text`` to ``path`` through a temporary sibling, flushed to disk and renamed into place."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}{TMP_MARK}", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline="") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        _apply_umask(Path(tmp), directory=False)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    return path


def check_writable_folder(folder: str | Path, what: str = "output folder") -> Path:
    """Create ``folder`` if needed and prove it can be written (a file is created and removed), before any work
    starts; a sentence says why not (an existing file, a read-only or full file system, no permission)."""
    folder = Path(folder).expanduser()
    if folder.exists() and not folder.is_dir():
        raise LumbarBMDError(f"the {what} {folder} exists and is not a folder; choose a folder")
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=f".write-test{TMP_MARK}", dir=folder)
        os.close(fd)
        os.unlink(probe)
    except OSError as err:
        raise LumbarBMDError(f"cannot write to the {what} {folder}: {err.strerror or err}") from None
    return folder

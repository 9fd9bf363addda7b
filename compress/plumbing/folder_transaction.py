"""An output folder written as a transaction: one writer at a time, and a reader sees the old folder or the new one,
whole, at every instant and after a kill at any point (torch-free: the target-side tools use it too).

``with folder_transaction(folder, owner) as staging:`` does four things:

1. **One writer.** An advisory ``fcntl.flock`` on ``.<name>.lock`` beside the folder (beside, not inside, so it
   outlives the swap), held for the whole run. A second writer refuses at once (``FolderBusy``: one line naming
   the folder and the holder's pid, which the lock file holds); it does not wait, so a CI matrix or a shell loop
   finds out straight away instead of hanging. The kernel drops a flock with its process, so a lock left by a
   killed writer never blocks. Readers take no lock: what they read is never half-written.
2. **Recovery** of what a killed writer left, under the lock (so nothing it finds is in use):
   ``.<name>.staging`` is removed; ``.<name>.old`` (the fallback swap killed between its two renames,
   ``<name>`` missing) is renamed back to ``<name>``, else removed. Every writer recovers first; a reader calls
   ``recovered(folder)``, which acts only in the one state a reader cannot read (``<name>`` missing).
3. **Staging.** ``.<name>.staging`` beside the folder: empty (a new export), or a hard-linked copy of the current
   folder (an update). The body writes the whole new folder there.
4. **Swap.** On a clean exit the files are flushed to disk and the staging folder takes the folder's place in
   one ``renameat2(RENAME_EXCHANGE)``; where the system has none, two renames (``<name>`` -> ``.<name>.old``,
   staging -> ``<name>``) whose only gap, ``<name>`` missing, is what recovery repairs. On an exception or
   Ctrl-C the staging folder is removed and the folder is untouched.

While a writer holds the lock, the folder is its own: a file changed in the folder meanwhile by hand is not
carried into the new one.
"""
from __future__ import annotations

import ctypes
import errno
import fcntl
import logging
import os
import shutil
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterable, Iterator

from compress.plumbing.errors import PipelineError
from compress.plumbing.files import OutputError

log = logging.getLogger(__name__)

AT_FDCWD = -100  # <fcntl.h>: paths relative to the working directory
RENAME_EXCHANGE = 2  # <linux/fs.h>: swap the two names atomically (Linux 3.15+, glibc 2.28+)
# The answers of a system or filesystem that cannot exchange: fall back to two renames.
NO_EXCHANGE = {errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP, errno.ENOTSUP}


class FolderBusy(PipelineError):
    """Another process holds the folder's lock: it is writing the folder now."""


def sibling(folder: Path, suffix: str) -> Path:
    """``.<name><suffix>`` beside ``folder``: hidden, on the same filesystem, so a rename can move it in."""
    return folder.parent / f".{folder.name}{suffix}"


def lock_path(folder: Path) -> Path:
    return sibling(folder, ".lock")


def staging_path(folder: Path) -> Path:
    return sibling(folder, ".staging")


def old_path(folder: Path) -> Path:
    return sibling(folder, ".old")


@contextmanager
def one_line_errors(action: str, folder: Path) -> Iterator[None]:
    """An OSError inside becomes the user's one line: OutputError('cannot <action> <folder>: <reason>')."""
    try:
        yield
    except OSError as exc:
        raise OutputError(f"cannot {action} {folder}: {exc.strerror or exc}") from None


# --- one writer ----------------------------------------------------------------------------------------------------


def holder_of(handle: int) -> str:
    """'pid 1234, python -m export.build' from an open lock file (what its holder wrote into it)."""
    text = os.pread(handle, 200, 0).decode(errors="replace").strip()
    pid, _, owner = text.partition(" ")
    return f"pid {pid}, {owner}" if pid.isdigit() else "its pid not yet written"


def same_file(handle: int, path: Path) -> bool:
    """Whether ``path`` still names the file open as ``handle`` (a releasing holder may just have unlinked it)."""
    try:
        named = os.stat(path)
    except FileNotFoundError:
        return False
    opened = os.fstat(handle)
    return (named.st_dev, named.st_ino) == (opened.st_dev, opened.st_ino)


def acquire(path: Path, folder: Path) -> int:
    """The open, locked lock file ``path``; FolderBusy when another process holds it."""
    while True:
        handle = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o666)
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = holder_of(handle)
            os.close(handle)
            raise FolderBusy(f"{folder} is being written by another process ({holder}): one writer per folder; "
                             "wait for it to finish, or write to another folder") from None
        if same_file(handle, path):
            return handle
        os.close(handle)  # we locked a lock file its holder removed on release: lock the one the path names now


@contextmanager
def folder_lock(folder: Path, owner: str) -> Iterator[None]:
    """Hold the advisory lock of ``folder`` (``.<name>.lock`` beside it); ``owner`` names the command holding it.

    The lock file is removed on release (while still locked; a waiter that locked the removed file notices and
    retries), so a finished run leaves nothing beside the folder; a killed one leaves a lock file that no process
    holds and the next writer takes over.
    """
    folder = Path(folder)
    path = lock_path(folder)
    with one_line_errors("write to", folder):
        folder.parent.mkdir(parents=True, exist_ok=True)
        handle = acquire(path, folder)
    try:
        os.ftruncate(handle, 0)
        os.pwrite(handle, f"{os.getpid()} {owner}\n".encode(), 0)  # for the message of a refused writer
        yield
    finally:
        path.unlink(missing_ok=True)
        os.close(handle)  # closing drops the flock; a killed process's is dropped the same way, by the kernel


# --- recovery -------------------------------------------------------------------------------------------------------


def recover(folder: Path) -> list[str]:
    """Put right what a killed writer left beside ``folder`` (call it holding the lock); what was done, as notes."""
    notes = []
    old = old_path(folder)
    if old.is_dir() and not folder.exists():
        os.rename(old, folder)
        notes.append(f"restored {folder} from {old.name}: a writer was killed between the two renames of its swap")
    for leftover in (staging_path(folder), old):
        if leftover.exists() or leftover.is_symlink():
            remove(leftover)
            notes.append(f"removed {leftover}, left by a writer that was killed")
    return notes


def remove(path: Path) -> None:
    """Remove a file or a folder tree (ignoring what is already gone)."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def recovered(folder: str | os.PathLike) -> Path:
    """``folder`` for a reader: where a two-rename swap was killed between its renames (no folder, ``.<name>.old``
    beside it), the old folder is first put back under the lock. A live writer in that gap is waited for (it lasts
    two renames). Costs two stats when there is nothing to recover; returns ``folder``."""
    real = Path(os.path.realpath(folder))
    for _ in range(100):
        if real.exists() or not old_path(real).is_dir():
            break
        try:
            with folder_lock(real, "a reader putting back an interrupted swap"):
                for note in recover(real):
                    log.warning("note: %s", note)
        except FolderBusy:
            time.sleep(0.05)
        except OutputError:
            break  # cannot write beside it: the reader reports the folder as it finds it
    return Path(folder)


# --- staging --------------------------------------------------------------------------------------------------------


def link_or_copy(source: str, destination: str) -> None:
    """A hard link where the filesystem has them, else a copy.

    A hard link shares the file with the live folder. That is safe because no writer of this project changes a
    file in place: every one replaces a file by writing a new one and renaming it over the old name
    (``compress.plumbing.files.atomic_write``), which gives the staging folder a new file and leaves the live
    folder's untouched.
    """
    try:
        os.link(source, destination, follow_symlinks=False)
    except OSError:
        shutil.copy2(source, destination, follow_symlinks=False)


def link_into(source: Path, destination: Path, names: Iterable[str]) -> None:
    """Hard-link (or copy) the entries ``names`` of the folder ``source`` into ``destination``; folders as trees."""
    for name in names:
        entry = source / name
        if entry.is_dir() and not entry.is_symlink():
            shutil.copytree(entry, destination / name, symlinks=True, copy_function=link_or_copy)
        else:
            link_or_copy(str(entry), str(destination / name))


def open_staging(folder: Path, from_current: bool) -> Path:
    """``.<name>.staging``: empty, or with ``from_current`` a hard-linked copy of the folder as it is now."""
    staging = staging_path(folder)
    staging.mkdir()  # the umask's permissions, like any folder the user makes
    if from_current and folder.is_dir():
        shutil.copystat(folder, staging)
        link_into(folder, staging, sorted(p.name for p in folder.iterdir()))
    return staging


# --- the swap -------------------------------------------------------------------------------------------------------


def renameat2():
    """libc's ``renameat2``, or None where the C library has none (not Linux, or glibc before 2.28)."""
    try:
        function = ctypes.CDLL(None, use_errno=True).renameat2
    except (AttributeError, OSError):
        return None
    function.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    function.restype = ctypes.c_int
    return function


def exchange(first: Path, second: Path) -> bool:
    """Swap the names of two existing paths in one atomic step; False where the system or filesystem cannot."""
    function = renameat2()
    if function is None:
        return False
    if function(AT_FDCWD, os.fsencode(first), AT_FDCWD, os.fsencode(second), RENAME_EXCHANGE) == 0:
        return True
    code = ctypes.get_errno()
    if code in NO_EXCHANGE:
        return False
    raise OSError(code, os.strerror(code), str(first), None, str(second))


def fsync(path: str | os.PathLike) -> None:
    """Wait until the file, or the folder's list of names, is on the disk."""
    handle = os.open(path, os.O_RDONLY)
    try:
        os.fsync(handle)
    finally:
        os.close(handle)


def flush_to_disk(folder: Path) -> None:
    """fsync every file and folder of ``folder``: after a power loss the swapped-in folder has its contents."""
    for root, _, files in os.walk(folder):
        for path in [*(os.path.join(root, name) for name in files), root]:
            if not os.path.islink(path):
                fsync(path)


def swap_in(staging: Path, folder: Path) -> None:
    """Put the complete ``staging`` folder at ``folder``'s name, removing the previous folder."""
    if not folder.exists():
        os.rename(staging, folder)  # a new folder: one rename
    elif exchange(staging, folder):
        remove(staging)  # the old folder, now under the staging name
    else:
        old = old_path(folder)
        os.rename(folder, old)  # killed here: no <name>, and recover() renames .<name>.old back
        try:
            os.rename(staging, folder)
        except BaseException:
            os.rename(old, folder)
            raise
        remove(old)
    fsync(folder.parent)  # the renames themselves reach the disk


def name_the_folder(error: BaseException, staging: Path, folder: str) -> None:
    """A user error raised on a file of the staging folder names the file in the folder the user gave instead: the
    staging folder is gone by the time the message is read. (``args`` is what ``str(error)`` shows.)"""
    if isinstance(error, PipelineError):
        error.args = tuple(a.replace(str(staging), folder) if isinstance(a, str) else a for a in error.args)


# --- the transaction ------------------------------------------------------------------------------------------------


def check_replaceable(folder: Path) -> None:
    """Refuse what a rename cannot replace: a file where a folder should be, or a mount point."""
    if folder.exists() and not folder.is_dir():
        raise OutputError(f"{folder} exists and is not a folder")
    if folder.is_dir() and os.path.ismount(folder):
        raise OutputError(f"{folder} is a mount point, which cannot be replaced in one rename: write to a folder "
                          "inside it")


@contextmanager
def folder_transaction(folder: str | os.PathLike, owner: str, from_current: bool = False) -> Iterator[Path]:
    """Lock ``folder``, recover what a killed writer left, yield a staging folder, and swap it in on a clean exit.

    ``owner``: the command, named in the lock file (a refused writer's message shows it). ``from_current``: the
    staging folder starts as a hard-linked copy of the folder (an update) instead of empty (a rewrite): its files
    are then the live folder's, so the body must replace a file (``atomic_write``, or unlink and create), never
    write into one. Raises FolderBusy when another process writes the folder, OutputError when it cannot be
    written. See the module docstring for the promises.
    """
    given = str(folder)
    folder = Path(os.path.realpath(folder))  # through a symlink: the folder it names is the one replaced
    check_replaceable(folder)
    with folder_lock(folder, owner):
        with one_line_errors("write to", folder):
            for note in recover(folder):
                log.warning("note: %s", note)
            staging = open_staging(folder, from_current)
        try:
            yield staging
            with one_line_errors("replace", folder):
                flush_to_disk(staging)
                swap_in(staging, folder)
        except BaseException as error:
            remove(staging)
            name_the_folder(error, staging, given)
            raise

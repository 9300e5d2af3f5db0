"""Safe file writes: a temporary name renamed into place, a free-space check, a lock per writer.

A crash, a full disk or a second process writing the same thing must never leave a file that looks
complete but is not. So every output is written under `<name>.partial` and renamed onto its name
only once whole (a failed write removes the temporary file and leaves the previous one as it was);
a long write first checks that the disk has room; and a writer holds an advisory lock so a second
process refuses at once, naming the first one's pid. Standard library only; locks need POSIX.
"""

import fcntl
import os
import re
import shutil
from contextlib import contextmanager
from pathlib import Path

from inversion.core.errors import UserError


class DiskError(UserError):
    """The disk refused a write (full, over quota, read-only). Complete files are untouched, and a
    re-run once there is room continues where this one stopped."""


@contextmanager
def replacing(path):
    """Yields a temporary path beside `path` to write; renames it onto `path` if the block succeeds.

    If the write fails, the temporary file is removed, `path` keeps its previous contents, and an
    OSError or RuntimeError (what torch.save raises for a full disk) becomes a one-line DiskError.
    """
    path = Path(path)
    tmp = path.with_name(path.name + ".partial")
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException as e:
        tmp.unlink(missing_ok=True)
        if isinstance(e, (OSError, RuntimeError)):
            kept = "the previous file is unchanged" if path.exists() else "nothing was written"
            raise DiskError(f"could not write {path} ({reason(e)}; {size_text(free_bytes(path.parent))} free "
                            f"on {path.parent}); {kept}") from e
        raise


def write_text(path, text):
    with replacing(path) as tmp:
        tmp.write_text(text)


def free_bytes(directory):
    try:
        return shutil.disk_usage(directory).free
    except OSError:
        return 0


def check_free_space(directory, needed, what, advice):
    """Refuse (DiskError) before writing `needed` bytes into `directory` if the disk lacks the room."""
    free = free_bytes(directory)
    if needed > free:
        raise DiskError(f"not enough free space on {directory} for {what}: needs {size_text(needed)}, "
                        f"{size_text(free)} free; {advice}")


@contextmanager
def lock(path, what):
    """Hold an exclusive lock on the file `path` (created, holding our pid) while the block runs.

    Non-blocking: if another process holds it, a one-line UserError names its pid. The kernel drops
    the lock when its holder dies (even by kill -9), so a stale file never blocks anyone; the holder
    deletes it on the way out, and a process that locked a file deleted meanwhile tries again.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    while True:
        fd = _claim(path)
        if fd is not None:
            break
        _refuse_or_clear(path, what)
    try:
        yield
    finally:
        path.unlink(missing_ok=True)  # before releasing: whoever waits then finds a fresh file
        os.close(fd)


def _claim(path):
    """A new lock file at `path`, locked and holding our pid before it has that name, as its descriptor; None
    where `path` exists. Written under a temporary name and hard-linked into place (a link never replaces a
    file): a lock file created at its name and written once locked could be read empty in between, and a
    second process then named "pid unknown" (one test in a few hundred under load)."""
    tmp = path.with_name(f"{path.name}.{os.getpid()}.new")
    fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)  # no one else knows the name: at once
        try:
            os.write(fd, f"{os.getpid()}\n".encode())
        except OSError:
            pass  # a full disk: the lock holds without the pid
        os.link(tmp, path)
        return fd
    except FileExistsError:
        os.close(fd)
        return None
    except OSError:  # a file system without hard links: created in place, its pid written once locked
        os.close(fd)
        return _claim_in_place(path)
    finally:
        tmp.unlink(missing_ok=True)


def _claim_in_place(path):
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    if not _same_file(fd, path):
        os.close(fd)
        return None
    try:
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
    except OSError:
        pass
    return fd


def _refuse_or_clear(path, what):
    """`path` exists: refuse, naming the pid in it, while its holder lives; a dead holder's file (its lock gone
    with it) is removed, so that the caller claims afresh. Returns when the caller should try again."""
    try:
        fd = os.open(path, os.O_RDWR)
    except FileNotFoundError:
        return  # its holder has just left
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 32).decode(errors="replace").strip() or "unknown"
            raise UserError(f"another process (pid {holder}) is writing {what}; wait for it to finish "
                            f"(or stop it) and re-run") from None
        if _same_file(fd, path):  # a dead holder's: only the holder of its lock removes it
            path.unlink()
    finally:
        os.close(fd)


def _same_file(fd, path):
    try:
        return os.fstat(fd).st_ino == os.stat(path).st_ino
    except FileNotFoundError:
        return False


def discard_writes(fd):
    """Point file descriptor `fd` at /dev/null, so a library that keeps retrying failed writes
    (HDF5 after "No space left on device") can close without touching the file again."""
    sink = os.open(os.devnull, os.O_RDWR)
    os.dup2(sink, fd)
    os.close(sink)


def reason(exc):
    """The short cause of a failed write: the OS's words where there are any, else the first line."""
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    text = str(exc)
    found = re.search(r"error message = '([^']+)'", text)  # HDF5 quotes the OS's words like this
    return found.group(1) if found else (text.strip().splitlines() or [type(exc).__name__])[0][:200]


def size_text(n):
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:,} B" if unit == "B" else f"{n:,.1f} {unit}"
        n /= 1024

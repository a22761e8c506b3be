"""What an interrupted atomic write leaves behind, and cleaning it up on the next run.

Files and directories that must never be seen half-written (the acceptance index, a models
directory) are written under a temporary name beside their target and renamed over it. A
``kill -9`` or a power cut mid-write leaves the target as it was, plus that temporary. Its
name carries the writer's pid (``temp_prefix``), so the next writer removes exactly the
temporaries of processes that no longer run (``remove_stale``) and never one being written.
"""

from __future__ import annotations

import ctypes
import errno
import os
import secrets
import shutil
import sys
import tempfile
from pathlib import Path


def temp_prefix(name: str) -> str:
    """``.<name>.<pid>.``: the prefix for this process's temporaries of ``name``."""
    return f".{name}.{os.getpid()}."


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


def remove_stale(parent: Path, name: str) -> list[Path]:
    """Remove the temporaries of ``name`` in ``parent`` whose writer is gone; returns them."""
    removed: list[Path] = []
    try:
        entries = list(os.scandir(parent))
    except OSError:
        return removed
    head = f".{name}."
    for entry in entries:
        if not entry.name.startswith(head):
            continue
        pid, _, _ = entry.name[len(head) :].partition(".")
        if not pid.isdigit() or int(pid) == os.getpid() or _alive(int(pid)):
            continue
        path = Path(entry.path)
        if entry.is_dir(follow_symlinks=False):
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
        removed.append(path)
    return removed


def fsync_path(path: Path) -> None:
    """fsync a file or a directory (so a rename in it survives a power cut)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def stage_dir(out: Path) -> Path:
    """A fresh temporary directory beside ``out`` for this process, after removing the
    temporaries of dead writers; its mode follows the umask (mkdtemp's 0700 would not)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    remove_stale(out.parent, out.name)
    tmp = Path(tempfile.mkdtemp(prefix=temp_prefix(out.name), dir=out.parent))
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)
    return tmp


def _exchange(a: Path, b: Path) -> bool:
    """Atomically swap two paths (Linux renameat2 RENAME_EXCHANGE). False where unsupported."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        fn = ctypes.CDLL(None, use_errno=True).renameat2
    except (AttributeError, OSError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    if fn(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP):  # old kernel or a filesystem without it
        return False
    raise OSError(err, f"renameat2({a}, {b}, RENAME_EXCHANGE): {os.strerror(err)}")


def swap_dir(new: Path, out: Path) -> None:
    """Make directory ``new`` appear at ``out``; the old ``out`` survives until the new one is
    in place (one atomic exchange where the kernel has it, else two renames with a way back).
    The caller decides first whether ``out`` may be replaced at all."""
    if out.exists() or out.is_symlink():
        if _exchange(new, out):
            shutil.rmtree(new)  # `new` now holds the previous directory
        else:
            old = out.with_name(f"{out.name}.old-{secrets.token_hex(4)}")
            os.rename(out, old)
            try:
                os.rename(new, out)
            except BaseException:
                os.rename(old, out)  # put the previous directory back before giving up
                raise
            shutil.rmtree(old)
    else:
        os.rename(new, out)
    fsync_path(out.parent)

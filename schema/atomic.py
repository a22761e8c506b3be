"""What an interrupted atomic write leaves behind, and cleaning it up on the next run.

Files and directories that must never be seen half-written (the acceptance index, a models
directory) are written under a temporary name beside their target and renamed over it. A
``kill -9`` or a power cut mid-write leaves the target as it was, plus that temporary. Its
name carries the writer's pid (``temp_prefix``), so the next writer removes exactly the
temporaries of processes that no longer run (``remove_stale``) and never one being written.
"""

from __future__ import annotations

import os
import shutil
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

"""Worker processes that never outlive the command that started them.

``ProcessPoolExecutor`` workers wait on their call queue; when the parent is killed with
SIGKILL (an operator, the OOM killer, a crash test) nobody closes that queue and the workers
sleep forever, each holding its memory. ``die_with_parent`` is the pools' initializer: on
Linux it asks the kernel to SIGKILL the worker when its parent dies (``PR_SET_PDEATHSIG``).
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys
from concurrent.futures import ProcessPoolExecutor

_PR_SET_PDEATHSIG = 1


def die_with_parent(parent: int) -> None:
    """Pool initializer: this worker gets SIGKILL when its parent process (pid ``parent``) dies.

    The parent's pid comes from the parent itself: read here with ``getppid`` it would already
    be the reaper's when the parent died between the fork and this line, and the check below
    would pass.
    """
    if not sys.platform.startswith("linux"):
        return
    try:
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    except (AttributeError, OSError):
        return
    if os.getppid() != parent:  # the parent died before the request took hold
        os._exit(1)


def worker_pool(max_workers: int) -> ProcessPoolExecutor:
    """The trainer's process pool: workers that die with their parent."""
    return ProcessPoolExecutor(max_workers=max_workers, initializer=die_with_parent, initargs=(os.getpid(),))

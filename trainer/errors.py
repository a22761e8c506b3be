"""The trainer's error policy as types: library code raises these, only `trainer/cli.py` exits.

Every message names the file (or option) and says what to do about it; `phasewatch` prints
it as one line on stderr and exits with ``exit_code`` (a traceback only with ``--debug``).
"""

from __future__ import annotations

from typing import ClassVar


class TrainerError(Exception):
    """A trainer step cannot go on as asked; the message names the file or option and the fix."""

    exit_code: ClassVar[int] = 2


class DatasetError(TrainerError):
    """The store, index, feature cache or held-out windows cannot give what the step needs."""


class ExportError(TrainerError):
    """The run cannot be exported as is; the message names the file or model and the numbers."""

    exit_code: ClassVar[int] = 1  # what `phasewatch export` has always returned for a refused run


class BenchError(TrainerError):
    """The benchmark cannot run as asked; the message names the file or option."""

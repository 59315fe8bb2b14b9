"""Errors raised by resilient.

Hierarchy::

    ResilientError                  base of everything raised on purpose
    ├── InvalidArgumentError        a fit() argument is wrong; nothing was started or written (ValueError)
    ├── InvalidPolicyError          a policy file or object is wrong (ValueError)
    ├── RunDirError                 the run directory belongs to another run, or is locked
    ├── UserCodeError               the training code raised an ordinary exception; not retried
    └── TrainingFailedError         restarts ran out or made no progress; the text is a root-cause report
        └── DiskFullError           the run's file system is full; free space and call fit again to resume
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ._incident import Incident


class ResilientError(Exception):
    """Base class of the errors resilient raises on purpose."""


class InvalidArgumentError(ResilientError, ValueError):
    """A fit() argument was rejected before anything was started or written."""


class InvalidPolicyError(ResilientError, ValueError):
    """A policy file or Policy object is invalid."""


class RunDirError(ResilientError):
    """The run directory cannot be used for this call (another model, or another live run)."""


class UserCodeError(ResilientError):
    """The training code raised an ordinary exception; the run was not retried."""

    def __init__(self, message: str, *, traceback: str = "", run_dir: str | None = None) -> None:
        super().__init__(message)
        self.worker_traceback = traceback
        self.run_dir = run_dir


class TrainingFailedError(ResilientError):
    """The run could not be completed; ``str(err)`` is the root-cause report."""

    def __init__(self, report: str, *, incidents: list[Incident], run_dir: str) -> None:
        super().__init__(report)
        self.incidents = incidents
        self.run_dir = run_dir


class DiskFullError(TrainingFailedError):
    """The run directory's file system is full (or over quota); the run stopped instead of retrying.

    Its own class because its remedy is not a change of code or settings: free space (``free_bytes``
    of ``needed_bytes`` on the file system of ``path``) and call fit again with the same run_dir, which
    resumes from the last checkpoint. An unattended script can catch it, clean up and call again.
    """

    def __init__(self, report: str, *, incidents: list[Incident], run_dir: str, path: str,
                 free_bytes: int | None, needed_bytes: int | None) -> None:
        super().__init__(report, incidents=incidents, run_dir=run_dir)
        self.path = path
        self.free_bytes = free_bytes
        self.needed_bytes = needed_bytes

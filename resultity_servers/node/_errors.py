"""The error family of the node (Agent and Runtime supervision)."""

from __future__ import annotations

from resultity_core import ResultityError

__all__ = [
    "FrameError",
    "JobSpecError",
    "ModelInstallError",
    "NodeError",
    "RegistrationError",
    "RuntimeFailedError",
    "RuntimeJobError",
]


class NodeError(ResultityError):
    """Base of every error raised by resultity_servers.node."""


class FrameError(NodeError):
    """A frame of the Agent <-> Runtime protocol is oversize, not JSON, or not a valid message.

    ``field`` names the offending field (``<frame>`` for the framing itself).
    """

    def __init__(self, field: str, reason: str) -> None:
        self.field = field
        self.reason = reason
        super().__init__(f"{field}: {reason}")


class JobSpecError(NodeError):
    """A leased job's request cannot be run; ``field`` names the offending field."""

    def __init__(self, field: str, reason: str) -> None:
        self.field = field
        self.reason = reason
        super().__init__(f"{field}: {reason}")


class RuntimeFailedError(NodeError):
    """The Runtime child could not be started, loaded, or kept alive."""


class RuntimeJobError(NodeError):
    """One job failed in the Runtime; ``retryable`` is True when it produced no output yet."""

    def __init__(self, job_id: str, reason: str, *, retryable: bool = False) -> None:
        self.job_id = job_id
        self.reason = reason
        self.retryable = retryable
        super().__init__(f"job {job_id}: {reason}")


class ModelInstallError(NodeError):
    """An approved model could not be installed (missing file, wrong size or sha256)."""


class RegistrationError(NodeError):
    """The Network refused this node (bad grant, failed challenge) or sent a bad answer."""

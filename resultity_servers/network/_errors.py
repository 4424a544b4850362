"""The error family of the Network: one base class, each subclass named for what went wrong.

Each class carries the HTTP ``status`` the Network's HTTP app answers with. Errors the Cloud
passes on to OpenAI clients (bad API key, out of credits, unknown model, no node) are the core's
``OpenAIRequestError`` subclasses instead, so the Cloud can forward them unchanged.
"""

from __future__ import annotations

from resultity_core import ResultityError

__all__ = [
    "AdmissionError",
    "JobStateError",
    "NetworkError",
    "NodeAuthError",
    "ReceiptConflictError",
    "ReceiptError",
    "UnknownJobError",
    "UnknownNodeError",
]


class NetworkError(ResultityError):
    """Base of the Network coordinator's errors; ``status`` is the HTTP status to answer."""

    status: int = 400
    code: str = "network_error"


class AdmissionError(NetworkError):
    """A node was refused: bad or expired grant, unknown account, bad challenge signature."""

    status = 403
    code = "admission_refused"


class NodeAuthError(NetworkError):
    """A node request carried no valid session (missing, unknown, expired, or node dead)."""

    status = 401
    code = "node_unauthorized"


class UnknownNodeError(NetworkError):
    """No node with this id is registered."""

    status = 404
    code = "unknown_node"


class UnknownJobError(NetworkError):
    """No job with this id (or not one the caller may see)."""

    status = 404
    code = "unknown_job"


class JobStateError(NetworkError):
    """The job cannot take this step now (wrong node, out-of-order event, finished job)."""

    status = 409
    code = "job_state"


class ReceiptError(NetworkError):
    """A receipt was refused: bad signature, wrong node, wrong job, model or request hash."""

    status = 400
    code = "receipt_refused"


class ReceiptConflictError(ReceiptError):
    """A different receipt for the same job was already accepted."""

    status = 409
    code = "receipt_conflict"

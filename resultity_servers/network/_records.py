"""The rows the Network keeps: frozen attrs records, the same for every store backend."""

from __future__ import annotations

from typing import Any

import attrs

from resultity_core import Capabilities, JobState, NodeState, Price

__all__ = [
    "AccountRecord",
    "ApiKeyRecord",
    "GrantRecord",
    "JobRecord",
    "LedgerEntry",
    "NodeRecord",
    "ReceiptRecord",
    "SnapshotRecord",
]


@attrs.frozen
class AccountRecord:
    """An account: id, creation time, and the hex Ed25519 public key that signs its grants."""

    account_id: str
    created: float
    public_key: str | None = None


@attrs.frozen
class ApiKeyRecord:
    """An API key, kept only as the hex SHA-256 of the plaintext; ``prefix`` is for display."""

    key_hash: str
    account_id: str
    created: float
    prefix: str


@attrs.frozen
class NodeRecord:
    """A node: its id is its key id; ``session_hash`` is the SHA-256 of its session token."""

    node_id: str
    public_key: str
    account_id: str
    state: NodeState
    registered_at: float
    last_heartbeat: float
    capabilities: Capabilities
    config_hash: str | None = None
    active_jobs: int = 0
    free_slots: int = 0
    session_hash: str | None = None
    session_expires: float = 0.0


@attrs.frozen
class GrantRecord:
    """The signed NodeGrant envelope (JSON form) that admitted a node."""

    node_id: str
    account_id: str
    envelope: dict[str, Any]
    issued_at: int
    expires_at: int


@attrs.frozen
class SnapshotRecord:
    """A published signed NodeConfig envelope (JSON form) and its ``node_config_hash``."""

    config_hash: str
    envelope: dict[str, Any]
    version: int
    published_at: float


@attrs.frozen
class JobRecord:
    """One job and its money: ``reserved`` micro-credits are held until it is settled.

    ``node_id`` is set while the job is assigned to a node (queued for it, leased or
    streaming) and kept afterwards. ``completion_tokens`` is what the Network saw stream
    (or the node's final usage); ``charge`` is what the requester paid once ``settled``.
    ``choices`` is how many ``done`` events (one per choice index) finish the job.
    """

    job_id: str
    account_id: str
    model: str
    request: dict[str, Any]
    state: JobState
    created: float
    max_tokens: int
    prompt_tokens_estimate: int
    price: Price
    reserved: int
    choices: int = 1
    node_id: str | None = None
    attempts: int = 0
    first_token_at: float | None = None
    finished_at: float | None = None
    deadline: float | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    charge: int | None = None
    settled: bool = False
    error: str | None = None


@attrs.frozen
class ReceiptRecord:
    """An accepted node receipt; ``charge`` is None when it arrived after the job was settled."""

    job_id: str
    node_id: str
    envelope: dict[str, Any]
    prompt_tokens: int
    completion_tokens: int
    received_at: float
    charge: int | None = None
    payee_account: str | None = None
    payee_amount: int = 0
    platform_amount: int = 0


@attrs.frozen
class LedgerEntry:
    """One line of the ledger journal: ``amount`` moved for ``account_id`` (signed)."""

    at: float
    kind: str
    account_id: str
    amount: int
    job_id: str | None = None
    seq: int = 0

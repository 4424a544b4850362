"""resultity_servers.network: the Network coordinator, its stores and its HTTP app.

``Coordinator`` is sans-IO (the caller passes ``now``) over a ``Store`` (``MemoryStore`` or
the durable ``SQLiteStore``). The HTTP app and ``serve_network`` drive it with anyio.
"""

from __future__ import annotations

from ._app import NetworkApp
from ._coordinator import AccountBalance, Coordinator, ModelInfo
from ._desk import n_choices
from ._errors import (
    AdmissionError,
    JobStateError,
    NetworkError,
    NodeAuthError,
    ReceiptConflictError,
    ReceiptError,
    UnknownJobError,
    UnknownNodeError,
)
from ._http_util import decimalize
from ._jobs import JobEventsView
from ._memory import MemoryStore
from ._money import job_cost
from ._nodes import HeartbeatReply, NodeSession, hash_secret
from ._receipts import ReceiptOutcome
from ._records import (
    AccountRecord,
    ApiKeyRecord,
    GrantRecord,
    JobRecord,
    LedgerEntry,
    NodeRecord,
    ReceiptRecord,
    SnapshotRecord,
)
from ._serve import DB_FILE, NetworkSettings, open_store, running_network, serve_network
from ._settings import CoordinatorSettings
from ._sqlite import SQLiteStore
from ._sqlite_schema import SCHEMA_VERSION
from ._store import ACTIVE_JOB_STATES, Store, StoreTx

__all__ = [
    "ACTIVE_JOB_STATES",
    "DB_FILE",
    "SCHEMA_VERSION",
    "AccountBalance",
    "AccountRecord",
    "AdmissionError",
    "ApiKeyRecord",
    "Coordinator",
    "CoordinatorSettings",
    "GrantRecord",
    "HeartbeatReply",
    "JobEventsView",
    "JobRecord",
    "JobStateError",
    "LedgerEntry",
    "MemoryStore",
    "ModelInfo",
    "NetworkApp",
    "NetworkError",
    "NetworkSettings",
    "NodeAuthError",
    "NodeRecord",
    "NodeSession",
    "ReceiptConflictError",
    "ReceiptError",
    "ReceiptOutcome",
    "ReceiptRecord",
    "SQLiteStore",
    "SnapshotRecord",
    "Store",
    "StoreTx",
    "UnknownJobError",
    "UnknownNodeError",
    "decimalize",
    "hash_secret",
    "job_cost",
    "n_choices",
    "open_store",
    "running_network",
    "serve_network",
]

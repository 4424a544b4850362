"""resultity_servers.network: the Network coordinator, its stores and its HTTP app.

``Coordinator`` is sans-IO (every call takes ``now``, Unix seconds) over a ``Store``:
``MemoryStore`` (tests) or ``SQLiteStore`` (WAL, durable, versioned schema). ``NetworkApp``
serves it over the shared HTTP layer; ``serve_network`` / ``running_network`` start it from
``NetworkSettings``. Importing this package never imports torch.

Trust decisions, in one place:

* an account registers an Ed25519 public key (at creation or later); a ``NodeGrant`` is
  accepted only when signed by its account's registered key;
* a node proves its key by signing ``bytes.fromhex(challenge.nonce)``; it then uses a random
  session token (``Authorization: Bearer rns-...``), stored hashed, valid until it dies
  (heartbeat timeout, expired grant, new registration) or ``session_ttl_s`` passes;
* the Cloud and operators use one shared service token;
* receipts must verify against the node's registered key and match the job (node, model,
  ``request_hash == canonical_digest(lease.request)``).

HTTP routes (prefix ``/network/v1``): nodes ``POST nodes/register``, ``nodes/challenge``
(open), ``nodes/heartbeat``, ``nodes/lease`` (long poll), ``nodes/events``,
``nodes/receipts`` (session); ``GET config``, ``config/{hash}`` = ``snapshots/{hash}``,
``health`` (open); Cloud ``POST auth``, ``GET models``, ``GET status``, ``POST jobs``,
``GET jobs/{id}``, ``GET jobs/{id}/events`` (SSE), ``POST jobs/{id}/cancel``; operators
``POST config``, ``GET|POST accounts``, ``GET accounts/{id}``, ``GET accounts/{id}/ledger``,
``POST accounts/{id}/credit|keys|public-key`` (service token).
"""

from __future__ import annotations

from ._admin import AdminRequestError, CreatedAccount, NetworkAdminClient
from ._app import NetworkApp
from ._app_releases import ReleaseRoutes, attach_releases, release_routes
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
from ._release_admin import node_update_statuses, publish_release, publish_root, upload_artifact
from ._releases import ReleaseDesk, ReleaseError, artifact_address
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
    "AdminRequestError",
    "AdmissionError",
    "ApiKeyRecord",
    "Coordinator",
    "CoordinatorSettings",
    "CreatedAccount",
    "GrantRecord",
    "HeartbeatReply",
    "JobEventsView",
    "JobRecord",
    "JobStateError",
    "LedgerEntry",
    "MemoryStore",
    "ModelInfo",
    "NetworkAdminClient",
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
    "ReleaseDesk",
    "ReleaseError",
    "ReleaseRoutes",
    "SQLiteStore",
    "SnapshotRecord",
    "Store",
    "StoreTx",
    "UnknownJobError",
    "UnknownNodeError",
    "artifact_address",
    "attach_releases",
    "decimalize",
    "hash_secret",
    "job_cost",
    "n_choices",
    "node_update_statuses",
    "open_store",
    "publish_release",
    "publish_root",
    "release_routes",
    "running_network",
    "serve_network",
    "upload_artifact",
]

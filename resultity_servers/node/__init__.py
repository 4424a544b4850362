"""resultity_servers.node: the Agent (keys, config, models, jobs) and its Runtime children.

The Agent dials out to the Network only; each approved model runs in a Runtime child process
(``_runtime_main``) that the Agent's ``RuntimeSupervisor`` starts, watches and restarts, and
talks to over a pipe with length-prefixed canonical JSON frames. torch is imported only in the
child: importing this package does not import it.
"""

from __future__ import annotations

from ._agent import Agent, save_trust_state
from ._envs import RuntimeEnvError, current_python, install_environment
from ._errors import (
    FrameError,
    JobSpecError,
    ModelInstallError,
    NodeError,
    RegistrationError,
    RuntimeFailedError,
    RuntimeJobError,
)
from ._fleet import prove_runtime
from ._frames import (
    DEFAULT_MAX_FRAME,
    RUNTIME_FINISH_REASONS,
    Abort,
    ErrorFrame,
    FrameDecoder,
    Generate,
    LoadModel,
    ModelLoaded,
    Ping,
    Pong,
    Ready,
    RuntimeMessage,
    Shutdown,
    TokenEvent,
    decode_frame_body,
    encode_frame,
)
from ._jobs import ActiveJob, run_job
from ._jobspec import (
    DECIMAL_FIELDS,
    JobSpec,
    check_sampling,
    decimal_text,
    job_output_hash,
    job_request_hash,
    parse_job_request,
)
from ._models import (
    LocalDirectorySource,
    ModelSource,
    Progress,
    install_model,
    installed_path,
    model_entry_for_dir,
)
from ._sandbox import SandboxLimits, confine, package_version, runtime_env
from ._serve import NodeSettings, build_agent, log_progress, prepare_node_dir, serve_node
from ._supervisor import RuntimeSpec, RuntimeSupervisor
from ._transport import (
    NODE_ROUTES,
    HeartbeatAnswer,
    HTTPNetworkTransport,
    NetworkTransport,
    ReleaseTransport,
    SessionLostError,
    TransportError,
)
from ._updates import RESTART_EXIT_CODE, AgentRestartRequired, UpdateError, Updater

__all__ = [
    "DECIMAL_FIELDS",
    "DEFAULT_MAX_FRAME",
    "NODE_ROUTES",
    "RESTART_EXIT_CODE",
    "RUNTIME_FINISH_REASONS",
    "Abort",
    "ActiveJob",
    "Agent",
    "AgentRestartRequired",
    "ErrorFrame",
    "FrameDecoder",
    "FrameError",
    "Generate",
    "HTTPNetworkTransport",
    "HeartbeatAnswer",
    "JobSpec",
    "JobSpecError",
    "LoadModel",
    "LocalDirectorySource",
    "ModelInstallError",
    "ModelLoaded",
    "ModelSource",
    "NetworkTransport",
    "NodeError",
    "NodeSettings",
    "Ping",
    "Pong",
    "Progress",
    "Ready",
    "RegistrationError",
    "ReleaseTransport",
    "RuntimeEnvError",
    "RuntimeFailedError",
    "RuntimeJobError",
    "RuntimeMessage",
    "RuntimeSpec",
    "RuntimeSupervisor",
    "SandboxLimits",
    "SessionLostError",
    "Shutdown",
    "TokenEvent",
    "TransportError",
    "UpdateError",
    "Updater",
    "build_agent",
    "check_sampling",
    "confine",
    "current_python",
    "decimal_text",
    "decode_frame_body",
    "encode_frame",
    "install_environment",
    "install_model",
    "installed_path",
    "job_output_hash",
    "job_request_hash",
    "log_progress",
    "model_entry_for_dir",
    "package_version",
    "parse_job_request",
    "prepare_node_dir",
    "prove_runtime",
    "run_job",
    "runtime_env",
    "save_trust_state",
    "serve_node",
]

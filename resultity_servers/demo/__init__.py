"""resultity_servers.demo: a whole Resultity network on one machine (127.0.0.1).

``prepare_demo`` writes keys, a trust root, the local model and the node directories into a
data directory; ``running_demo`` starts the Network (embedded SQLite), publishes a signed
NodeConfig approving the model, creates the accounts, starts the Cloud and N nodes (each an
Agent with its Runtime child process) and yields a ``Demo`` handle; ``run_demo`` is the
``resultity demo`` command. Importing this package does not import torch.
"""

from __future__ import annotations

from ._files import (
    DEMO_ACCOUNT,
    OPERATOR_ACCOUNT,
    PRICE,
    DemoFiles,
    DemoOptions,
    default_demo_dir,
    demo_node_config,
    prepare_demo,
    prepare_node_dir,
)
from ._run import (
    SAMPLE_PROMPT,
    Demo,
    check_port,
    run_demo,
    running_demo,
    sample_chat,
)

__all__ = [
    "DEMO_ACCOUNT",
    "OPERATOR_ACCOUNT",
    "PRICE",
    "SAMPLE_PROMPT",
    "Demo",
    "DemoFiles",
    "DemoOptions",
    "check_port",
    "default_demo_dir",
    "demo_node_config",
    "prepare_demo",
    "prepare_node_dir",
    "run_demo",
    "running_demo",
    "sample_chat",
]

"""resultity_servers: anyio + h11 servers, httpcore clients and the ``resultity`` CLI.

The Cloud and Network processes never import torch.
"""

from __future__ import annotations

__all__: list[str] = []

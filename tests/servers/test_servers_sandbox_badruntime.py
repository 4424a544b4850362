"""A fake Runtime that misbehaves only when started from an updated environment (no tests).

``python test_servers_sandbox_badruntime.py MODE LOGFILE``: run from an environment under a
node's ``runtimes/`` directory it is the fake Runtime in MODE (``crash_always``,
``exit_at_start``, ``garbage``, ``bad_load``, ``ok``, ...); from anywhere else the
well-behaved fake (``ok``). So an update to a bad MODE must fail its health check and leave
the old Runtime serving. Either way it first appends ``imports <version> <path>`` to LOGFILE:
the ``resultity`` version and the ``resultity_servers`` package it imports.
"""

from __future__ import annotations

import runpy
import sys
from importlib import metadata
from pathlib import Path

if __name__ == "__main__":
    import resultity_servers

    with open(sys.argv[2], "a") as log:
        log.write(f"imports {metadata.version('resultity')} {resultity_servers.__file__}\n")
    mode = sys.argv[1] if "/runtimes/" in sys.executable else "ok"
    fake = Path(__file__).with_name("test_servers_node_fakeruntime.py")
    sys.argv = [str(fake), mode, sys.argv[2]]
    runpy.run_path(str(fake), run_name="__main__")

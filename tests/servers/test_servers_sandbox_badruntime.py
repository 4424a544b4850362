"""A Runtime that misbehaves only when started from an updated environment (no tests here).

``python test_servers_sandbox_badruntime.py MODE LOGFILE``: run from an environment under a
node's ``runtimes/`` directory it is the fake Runtime in MODE (``crash_always``,
``exit_at_start``, ``garbage``, ``bad_load``, ...); from anywhere else the well-behaved fake
(``ok``). So an update to it must fail its health check and leave the old Runtime serving.
"""

from __future__ import annotations

import runpy
import sys
from pathlib import Path

if __name__ == "__main__":
    mode = sys.argv[1] if "/runtimes/" in sys.executable else "ok"
    fake = Path(__file__).with_name("test_servers_node_fakeruntime.py")
    sys.argv = [str(fake), mode, sys.argv[2]]
    runpy.run_path(str(fake), run_name="__main__")

#!/bin/sh
# Start the Resultity node Agent from the release it installed last, if any.
#
# An update installs a release into DATA_DIR/runtimes/<version>/venv and records it in
# DATA_DIR/runtimes/current.json. The Runtime children switch in process; the Agent itself
# runs the new code after a restart: with RESULTITY_NODE_RESTART_ON_UPDATE=1 it exits once its
# jobs are done, the container's restart policy (or systemd's Restart=) starts this script
# again, and it runs the Agent with the installed release's interpreter. If that environment
# is missing or broken, the base install is used.
set -eu

DATA_DIR="${RESULTITY_NODE_DATA:-/var/lib/resultity/node}"
NETWORK="${RESULTITY_NETWORK:-http://127.0.0.1:8100}"
PYTHON=python3
CURRENT="$DATA_DIR/runtimes/current.json"

if [ -f "$CURRENT" ]; then
    CANDIDATE=$(python3 -c 'import json, sys; print(json.load(open(sys.argv[1]))["python"])' \
        "$CURRENT" 2>/dev/null || true)
    if [ -n "$CANDIDATE" ] && [ -x "$CANDIDATE" ] \
        && "$CANDIDATE" -c 'import resultity_servers.cli' 2>/dev/null; then
        PYTHON="$CANDIDATE"
    else
        echo "node-entrypoint: installed release unusable, starting the base install" >&2
    fi
fi

exec "$PYTHON" -c 'import sys; from resultity_servers.cli import main; sys.exit(main())' \
    node serve --network "$NETWORK" --data-dir "$DATA_DIR" "$@"

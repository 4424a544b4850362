"""A fake Runtime child for the supervisor and agent tests (run as a script; no tests here).

``python test_servers_node_fakeruntime.py MODE LOGFILE`` speaks the real frame protocol. Its
"engine" echoes the words of the prompt, one token per tick, and honours ``abort``. It appends
``start <pid>``, ``generate <job>`` and ``abort <job>`` lines to LOGFILE. MODE:

* ``ok``: behave; ``crash_once``: exit on the first ``generate`` ever (marker: LOGFILE.crashed);
* ``crash_always``: exit on every ``generate``; ``crash_midstream``: exit after one token;
* ``hang``: hang on the first ``ping``; ``garbage``: send junk after ``ready``;
* ``oversize``: send a frame header announcing 1 GiB after ``ready``;
* ``exit_at_start``: exit before ``ready``; ``bad_load``: answer load_model with an error.
"""

from __future__ import annotations

import json
import os
import queue
import sys
import threading
import time
from pathlib import Path

TICK = 0.01


def main() -> int:
    from resultity_servers.node._frames import (
        Abort,
        ErrorFrame,
        FrameDecoder,
        Generate,
        LoadModel,
        ModelLoaded,
        Ping,
        Pong,
        Ready,
        Shutdown,
        TokenEvent,
        encode_frame,
    )

    mode, logfile = sys.argv[1], Path(sys.argv[2])

    def note(line: str) -> None:
        with logfile.open("a") as f:
            f.write(line + "\n")

    def send(message: object) -> None:
        os.write(1, encode_frame(message))  # type: ignore[arg-type]

    note(f"start {os.getpid()} {os.environ.get('HOME', '')} {json.dumps(sorted(os.environ))}")
    if mode == "exit_at_start":
        return 5
    send(Ready(os.getpid(), "fake", {"fake": True}))
    if mode == "garbage":
        os.write(1, b"\x00\x00\x00\x05hello")
    if mode == "oversize":
        os.write(1, b"\x40\x00\x00\x00")
    inbox: queue.Queue[object] = queue.Queue()

    def reader() -> None:
        decoder = FrameDecoder(max_frame=16 << 20)
        while data := os.read(0, 65536):
            for m in decoder.feed(data):
                inbox.put(m)
        inbox.put(None)

    threading.Thread(target=reader, daemon=True).start()
    jobs: dict[str, list[object]] = {}  # job id -> [remaining words, prompt tokens, produced]
    while True:
        try:
            m = inbox.get(timeout=TICK if jobs else None)
        except queue.Empty:
            m = "tick"
        if m is None or isinstance(m, Shutdown):
            return 0
        if isinstance(m, Ping):
            if mode == "hang":
                time.sleep(3600)
            send(Pong(m.seq, len(jobs)))
        elif isinstance(m, LoadModel):
            if mode == "bad_load":
                send(ErrorFrame(None, "load_model: no such model"))
            else:
                send(ModelLoaded(m.name, 64))
        elif isinstance(m, Generate):
            note(f"generate {m.job_id}")
            crashed = logfile.with_suffix(".crashed")
            if mode == "crash_always" or (mode == "crash_once" and not crashed.exists()):
                crashed.touch()
                return 3
            text = m.prompt if m.prompt is not None else str(m.messages[-1]["content"])
            words = text.split()
            limit = m.sampling.get("max_tokens") or 8
            out = [words[i % len(words)] for i in range(limit)]
            if "error" in words:
                send(ErrorFrame(m.job_id, "prompt: refused by the fake"))
                continue
            jobs[m.job_id] = [out, len(words), 0]
        elif isinstance(m, Abort):
            note(f"abort {m.job_id}")
            state = jobs.pop(m.job_id, None)
            if state is not None:
                usage = {"prompt_tokens": state[1], "completion_tokens": state[2]}
                send(TokenEvent(m.job_id, 0, "", [], "abort", usage))
        for job_id, state in list(jobs.items()):
            words_left: list[str] = state[0]  # type: ignore[assignment]
            word = words_left.pop(0)
            state[2] = int(state[2]) + 1  # type: ignore[call-overload]
            done = not words_left
            usage = ({"prompt_tokens": state[1], "completion_tokens": state[2]}
                     if done else None)
            text = word if state[2] == 1 else " " + word
            send(TokenEvent(job_id, 0, text, [int(state[2])], "length" if done else None, usage))
            if mode == "crash_midstream":
                return 3
            if done:
                del jobs[job_id]


if __name__ == "__main__":
    sys.exit(main())

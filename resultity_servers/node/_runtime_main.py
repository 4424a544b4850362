"""The Runtime child process: ``python -m resultity_servers.node._runtime_main [options]``.

Started by the Agent's ``RuntimeSupervisor`` with a cleared environment in a private working
directory. Before anything else it confines itself (``_sandbox.confine``: resource limits, no
core dumps, no new privileges, death with its parent, and where Linux allows, an empty network
namespace), then moves the protocol to a private descriptor so that a stray ``print`` (from a
library) lands on stderr instead of corrupting the frame stream. It holds no keys and opens no
sockets: it reads frames on stdin and writes frames on stdout.

The main loop drives ``resultity_runtime.Engine`` (``add_request`` / ``step`` / ``abort``) and
reads the incoming frames itself between engine steps (``_Inbox``: blocking while idle, without
waiting while requests run), so a job's frame reaches the engine without a hop through another
thread. ``ping`` is answered by the main loop, so a hung engine shows up as a missed ``pong``.
torch is imported only when a model is loaded.
"""

from __future__ import annotations

import argparse
import os
import select
import sys
from collections.abc import Sequence
from decimal import Decimal
from typing import TYPE_CHECKING, Any, BinaryIO

from ._errors import FrameError
from ._frames import (
    DEFAULT_MAX_FRAME,
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
    encode_frame,
)
from ._sandbox import SandboxLimits, confine, package_version

if TYPE_CHECKING:
    from resultity_runtime import Engine, SamplingParams, StreamDelta

__all__ = ["main"]

_IN_MAX_FRAME = 16 << 20
_REST_OF_FRAME_S = 5.0


class _Writer:
    """Writes frames to the protocol descriptor (from the main loop only)."""

    def __init__(self, out: BinaryIO) -> None:
        self._out = out

    def send(self, *messages: RuntimeMessage) -> None:
        # one write for all of them: an engine step's events cost one syscall, not one each
        data = b"".join(encode_frame(m, max_frame=DEFAULT_MAX_FRAME) for m in messages)
        if not data:
            return
        self._out.write(data)
        self._out.flush()


class _Inbox:
    """The Agent's frames on descriptor ``fd``, read by the main loop between engine steps."""

    def __init__(self, fd: int, writer: _Writer) -> None:
        self.fd = fd
        self.writer = writer
        self.decoder = FrameDecoder(max_frame=_IN_MAX_FRAME)

    def receive(self, *, wait: bool) -> list[RuntimeMessage | None]:
        """Return the frames that have arrived, waiting for one when ``wait``; a final None
        means the end (the Agent closed the pipe, or sent a bad frame: reported as fatal).

        A frame the Agent is still writing is waited for (up to ``_REST_OF_FRAME_S``), so a
        long prompt does not trickle in one read per engine step.
        """
        out: list[RuntimeMessage | None] = []
        timeout: float | None = None if wait else 0.0
        while True:
            try:
                readable, _, _ = select.select([self.fd], [], [], timeout)
                if not readable:
                    return out
                data = os.read(self.fd, 1 << 16)
            except OSError:
                data = b""
            if not data:
                out.append(None)
                return out
            try:
                out.extend(self.decoder.feed(data))
            except FrameError as exc:
                self.writer.send(ErrorFrame(None, f"bad frame from the agent: {exc}",
                                            fatal=True))
                out.append(None)
                return out
            # Take what else is there without waiting; wait only for the rest of a frame.
            timeout = _REST_OF_FRAME_S if self.decoder.pending else 0.0


def _float(value: object, default: float) -> float:
    if value is None:
        return default
    return float(Decimal(str(value)))


def sampling_params(sampling: dict[str, Any], max_seq_len: int) -> SamplingParams:
    """Return the engine's SamplingParams for a checked sampling object (decimals -> floats).

    Raises InvalidSamplingParamsError (a ValueError) for values the engine refuses.
    """
    from resultity_runtime import SamplingParams

    s = sampling
    top_k = s.get("top_k") or 0
    return SamplingParams(
        max_tokens=s.get("max_tokens") or max_seq_len,
        temperature=_float(s.get("temperature"), 1.0),
        top_p=_float(s.get("top_p"), 1.0),
        top_k=top_k,
        min_p=_float(s.get("min_p"), 0.0),
        presence_penalty=_float(s.get("presence_penalty"), 0.0),
        frequency_penalty=_float(s.get("frequency_penalty"), 0.0),
        repetition_penalty=_float(s.get("repetition_penalty"), 1.0),
        logit_bias={int(k): _float(v, 0.0) for k, v in (s.get("logit_bias") or {}).items()},
        seed=s.get("seed"),
        stop=tuple(s.get("stop") or ()),
        ignore_eos=bool(s.get("ignore_eos", False)),
        logprobs=s.get("logprobs"),
        n=s.get("n") or 1,
    )


class _Runtime:
    def __init__(self, writer: _Writer) -> None:
        self.writer = writer
        self.engine: Engine | None = None
        self.model_name: str | None = None

    def handle(self, message: RuntimeMessage) -> bool:
        """Handle one frame; return False to exit."""
        if isinstance(message, Ping):
            active = self.engine.num_unfinished if self.engine is not None else 0
            self.writer.send(Pong(message.seq, active))
        elif isinstance(message, LoadModel):
            self._load(message)
        elif isinstance(message, Generate):
            self._generate(message)
        elif isinstance(message, Abort):
            if self.engine is not None:
                self.engine.abort(message.job_id)
        elif isinstance(message, Shutdown):
            return False
        else:
            self.writer.send(ErrorFrame(None, f"unexpected {message.TYPE} frame", fatal=True))
            return False
        return True

    def _load(self, m: LoadModel) -> None:
        from resultity_runtime import Engine

        kwargs: dict[str, Any] = {"max_num_seqs": m.max_num_seqs, "backend": m.backend}
        if m.max_model_len is not None:
            kwargs["max_model_len"] = m.max_model_len
        if m.kv_cache_bytes is not None:
            kwargs["kv_cache_bytes"] = m.kv_cache_bytes
        self.engine = None
        try:
            self.engine = Engine.from_pretrained(m.path, device=m.device, dtype=m.dtype,
                                                 quantization=m.quantization,
                                                 **kwargs)
        except Exception as exc:  # reported to the agent, which decides whether to retry
            self.writer.send(ErrorFrame(None, f"load_model {m.name}: {type(exc).__name__}: "
                                              f"{exc}"))
            return
        self.model_name = m.name
        self.writer.send(ModelLoaded(m.name, self.engine.max_seq_len))

    def _generate(self, m: Generate) -> None:
        if self.engine is None:
            self.writer.send(ErrorFrame(m.job_id, "no model is loaded"))
            return
        try:
            params = sampling_params(m.sampling, self.engine.max_seq_len)
            prompt: Any = m.prompt if m.prompt is not None else m.messages
            self.engine.add_request(m.job_id, prompt, params)
        except (ValueError, TypeError) as exc:
            self.writer.send(ErrorFrame(m.job_id, str(exc)))
        except Exception as exc:  # a bad request must never take the runtime down
            self.writer.send(ErrorFrame(m.job_id, f"{type(exc).__name__}: {exc}"))

    def step(self) -> None:
        assert self.engine is not None
        self.writer.send(*[self._event(delta) for delta in self.engine.step()])

    def _event(self, d: StreamDelta) -> TokenEvent:
        usage = None
        if d.usage is not None:
            usage = {"prompt_tokens": d.usage.prompt_tokens,
                     "completion_tokens": d.usage.completion_tokens}
        logprobs = None
        if d.logprobs is not None:
            assert self.engine is not None
            text = self._token_text
            logprobs = [
                {"token": text(lp.token_id), "token_id": lp.token_id,
                 "bytes": list(text(lp.token_id).encode("utf-8")),
                 "logprob": repr(lp.logprob), "rank": lp.rank,
                 "top_logprobs": [{"token": text(t), "token_id": t, "logprob": repr(v)}
                                  for t, v in lp.top]}
                for lp in d.logprobs
            ]
        return TokenEvent(d.request_id, d.index, d.text, list(d.token_ids), d.finish_reason,
                          usage, logprobs)

    def _token_text(self, token_id: int) -> str:
        # sentencepiece marks a leading space with U+2581; OpenAI shows the space itself.
        assert self.engine is not None
        return self.engine.tokenizer.id_to_piece(token_id).replace("\u2581", " ")

    @property
    def busy(self) -> bool:
        return self.engine is not None and self.engine.has_unfinished()


def _parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="resultity-runtime", description=__doc__)
    p.add_argument("--max-open-files", type=int, default=256)
    p.add_argument("--max-address-space", type=int, default=0, help="bytes, 0 = no limit")
    p.add_argument("--max-cpu-seconds", type=int, default=0, help="0 = no limit")
    p.add_argument("--max-file-size", type=int, default=0, help="bytes, 0 = no limit")
    p.add_argument("--no-network-namespace", action="store_true")
    p.add_argument("--readonly", action="append", default=[], metavar="PATH",
                   help="make PATH read-only (private mount namespace)")
    p.add_argument("--writable", action="append", default=[], metavar="PATH",
                   help="keep PATH (inside a read-only one) writable")
    p.add_argument("--hide", action="append", default=[], metavar="PATH",
                   help="make PATH unreadable (private mount namespace)")
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the Runtime until stdin closes or ``shutdown``; return the exit status."""
    args = _parse_args(argv)
    sandbox = confine(SandboxLimits(
        max_open_files=args.max_open_files,
        max_address_space=args.max_address_space,
        max_cpu_seconds=args.max_cpu_seconds,
        max_file_size=args.max_file_size,
        network_namespace=not args.no_network_namespace,
        readonly_paths=tuple(args.readonly),
        writable_paths=tuple(args.writable),
        hidden_paths=tuple(args.hide),
    ))
    proto = os.fdopen(os.dup(1), "wb", buffering=0)
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    writer = _Writer(proto)
    writer.send(Ready(os.getpid(), package_version(), sandbox))
    inbox = _Inbox(0, writer)
    runtime = _Runtime(writer)
    try:
        while True:
            for message in inbox.receive(wait=not runtime.busy):
                if message is None or not runtime.handle(message):
                    return 0
            if runtime.engine is not None:
                runtime.step()
    except Exception as exc:
        writer.send(ErrorFrame(None, f"runtime failed: {type(exc).__name__}: {exc}", fatal=True))
        return 1


if __name__ == "__main__":
    sys.exit(main())

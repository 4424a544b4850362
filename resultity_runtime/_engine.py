"""The engine: continuous batching over a paged KV cache, driven one step at a time.

Low level (what the node server drives): ``add_request`` / ``step`` -> deltas / ``abort``.
High level: ``generate`` (blocking, many prompts batched), ``chat``, and ``stream`` (an async
iterator; the blocking steps run in worker threads, so the event loop is never blocked).

Public methods are thread-safe: one lock serialises steps and request changes. ``abort`` never
waits for it: the request is marked and its blocks are freed before the next step runs (at
once when no step is running).
"""

from __future__ import annotations

import importlib
import itertools
import threading
from collections import deque
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ._attention import AttentionBackend, AttentionMetadata, TorchAttentionBackend
from ._config import ModelConfig
from ._detok import IncrementalDetokenizer
from ._errors import RuntimeEngineError
from ._kv_cache import KVCache, plan_num_blocks
from ._loader import load_model
from ._model import LlamaForCausalLM
from ._outputs import CompletionOutput, FinishReason, RequestOutput, StreamDelta, Usage
from ._sampling import Sampler, SamplingParams, TokenLogprobs, make_generator, seed_value
from ._scheduler import Scheduler, SchedulerConfig, SchedulerOutput
from ._scheduler import Sequence as SchedSeq
from ._stop import StopMatcher
from ._tokenizer import Tokenizer

__all__ = ["Engine", "EngineRequestError", "Prompt"]

# a text prompt, prompt token ids, or chat messages (rendered with the chat template)
Prompt = str | Sequence[int] | Sequence[Mapping[str, Any]]


class EngineRequestError(RuntimeEngineError, ValueError):
    """A request cannot be accepted: empty or too long prompt, id in use, bad token id."""


def _select_backend(name: str, device: torch.device) -> AttentionBackend:
    """Returns the attention backend: "auto" is triton on CUDA when it imports, else torch.

    "triton" is honoured on any device (on CPU the Triton backend runs its kernels only under
    TRITON_INTERPRET=1 and otherwise defers to the torch reference).
    """
    if name not in ("auto", "torch", "triton"):
        raise ValueError(f"backend: unknown {name!r} (use auto, torch or triton)")
    if name == "torch" or (name == "auto" and device.type != "cuda"):
        return TorchAttentionBackend()
    try:
        module = importlib.import_module("resultity_runtime._triton_backend")
    except ImportError:
        if name == "triton":
            raise
        return TorchAttentionBackend()
    backend: AttentionBackend = module.TritonAttentionBackend()
    return backend


def _sampling_kernel(backend: AttentionBackend, device: torch.device) -> Any:
    """Returns the fused sampling kernel when the Triton backend runs its kernels (on CUDA,
    or on CPU under TRITON_INTERPRET=1), else None (the torch sampler)."""
    if backend.name != "triton":
        return None
    # imported by name, as the backend is: the kernels package is not type-checked
    kernels = importlib.import_module("resultity_kernels")
    compat = importlib.import_module("resultity_kernels._triton_compat")
    return kernels.sample if device.type == "cuda" or compat.interpreting() else None


@dataclass(eq=False)
class _Seq:
    """The output state of one generated sequence (index ``index`` of its request)."""

    req: _Request
    index: int
    sched: SchedSeq
    generator: torch.Generator | None
    seed: int  # the stream seed of the sampling kernel's draws (with the step)
    detok: IncrementalDetokenizer
    stop: StopMatcher | None
    text: list[str] = field(default_factory=list)
    logprobs: list[TokenLogprobs] | None = None
    new_ids: list[int] = field(default_factory=list)
    new_text: list[str] = field(default_factory=list)
    new_logprobs: list[TokenLogprobs] = field(default_factory=list)
    finish_reason: FinishReason | None = None
    stop_reason: str | int | None = None

    @property
    def output_ids(self) -> list[int]:
        return self.sched.token_ids[self.sched.num_prompt_tokens :]


@dataclass(eq=False)
class _Request:
    request_id: str
    prompt: str | None
    prompt_ids: list[int]
    params: SamplingParams
    seqs: list[_Seq] = field(default_factory=list)
    keep: bool = False  # generate()/stream() collect it; otherwise dropped once finished
    sink: deque[StreamDelta] | None = None

    @property
    def finished(self) -> bool:
        return all(s.finish_reason is not None for s in self.seqs)

    def usage(self) -> Usage:
        return Usage(len(self.prompt_ids), sum(len(s.output_ids) for s in self.seqs))


class Engine:
    """Runs one model for many concurrent requests. Build it with ``from_pretrained``.

    Settings: ``kv_cache_bytes`` (KV pool size; default ``memory_fraction`` of free memory,
    0.25 of MemAvailable on CPU and 0.85 of free GPU memory on CUDA, capped at what
    ``max_num_seqs`` sequences of ``max_model_len`` tokens can use), ``max_num_seqs`` (running
    sequences per step), ``max_num_batched_tokens`` (tokens per step: decodes first, then
    prefill chunks), ``block_size`` (tokens per KV block), ``max_model_len`` (default the
    model's max_position_embeddings), ``enable_prefix_caching`` (share computed prompt blocks
    between requests), ``backend`` ("auto": triton on CUDA when it imports, else torch),
    ``seed`` (for sampled requests without their own seed).

    Finish reasons: "stop" (EOS, a stop token id or a stop string), "length" (max_tokens or
    the context limit), "abort" (cancelled).
    """

    def __init__(
        self,
        model: LlamaForCausalLM,
        config: ModelConfig,
        tokenizer: Tokenizer,
        *,
        device: torch.device | str = "cpu",
        kv_cache_bytes: int | None = None,
        memory_fraction: float | None = None,
        max_num_seqs: int = 64,
        max_num_batched_tokens: int = 2048,
        block_size: int = 16,
        max_model_len: int | None = None,
        enable_prefix_caching: bool = True,
        backend: str = "auto",
        seed: int | None = None,
    ) -> None:
        self.model = model
        self.config = config
        self.tokenizer = tokenizer
        self.device = torch.device(device)
        self.dtype = next(model.parameters()).dtype
        self.backend = _select_backend(backend, self.device)
        self.max_model_len = min(max_model_len or config.max_position_embeddings,
                                 config.max_position_embeddings)
        num_blocks = plan_num_blocks(
            config, block_size, self.dtype, self.device, kv_cache_bytes=kv_cache_bytes,
            memory_fraction=memory_fraction, max_useful_tokens=max_num_seqs * self.max_model_len,
        )
        self.kv_cache = KVCache(config, num_blocks, block_size, self.dtype, self.device)
        self.scheduler = Scheduler(SchedulerConfig(
            num_blocks=num_blocks, block_size=block_size, max_num_seqs=max_num_seqs,
            max_num_batched_tokens=max(max_num_batched_tokens, max_num_seqs),
            max_model_len=self.max_model_len, enable_prefix_caching=enable_prefix_caching,
        ))
        self.block_size = block_size
        self.sampler = Sampler(seed, kernel=_sampling_kernel(self.backend, self.device))
        self.eos_ids = frozenset(tokenizer.eos_ids) | frozenset(config.eos_token_ids)
        self._lock = threading.Lock()
        self._requests: dict[str, _Request] = {}
        self._seqs: dict[int, _Seq] = {}
        self._seq_ids = itertools.count()
        self._request_ids = itertools.count()
        self._aborts: deque[tuple[str, bool]] = deque()
        self._ready: list[StreamDelta] = []

    @classmethod
    def from_pretrained(
        cls,
        path: str | Path,
        device: torch.device | str = "cpu",
        dtype: torch.dtype | str | None = None,
        *,
        prepack: bool = True,
        quantization: str | None = None,
        **kwargs: Any,
    ) -> Engine:
        """Returns an engine for the Hugging Face model directory ``path``.

        ``dtype``: float32 (CPU default: logits match transformers float32) or bfloat16 on
        CPU; float16/bfloat16 on CUDA. On a CPU with AVX512-BF16/AMX, ``dtype="bfloat16"``
        moves half the weight bytes per token: batch-1 decode about 1.4x and prefill about
        3x faster than float32, logits within about 0.1 of float32's (see
        benchmarks/RESULTS.md). ``prepack`` (CPU): keep a oneDNN-prepacked copy of every
        projection (faster steps; the projections then take twice the memory).
        ``quantization="int4"`` (CPU, bfloat16, the default dtype then): projections
        quantized to 4 bits in groups of 32, bfloat16 activations; batch-1 decode moves about
        a quarter of bfloat16's weight bytes, at a measured cost in accuracy (see
        benchmarks/RESULTS.md, "int4").
        Other keyword arguments are those of ``Engine`` (kv_cache_bytes, max_num_seqs,
        max_num_batched_tokens, block_size, max_model_len, enable_prefix_caching, backend).
        Raises ModelLoadError for a bad directory, ValueError for bad settings.
        """
        model, config, tokenizer = load_model(path, device, dtype, prepack=prepack,
                                              quantization=quantization)
        return cls(model, config, tokenizer, device=device, **kwargs)

    # ---- requests ------------------------------------------------------------------------

    @property
    def max_seq_len(self) -> int:
        """The longest sequence (prompt + output) the engine can hold."""
        return self.scheduler.max_seq_len

    def _encode(self, prompt: Prompt) -> tuple[str | None, list[int]]:
        tok = self.tokenizer
        if isinstance(prompt, str):
            return prompt, tok.encode(prompt, add_bos=tok.add_bos_token)
        items = list(prompt)
        if not items:
            raise EngineRequestError("prompt: empty")
        if all(isinstance(m, Mapping) for m in items):
            text = tok.apply_chat_template(items)  # type: ignore[arg-type]
            return text, tok.encode_with_special(text, add_bos=tok.add_bos_token)
        if all(isinstance(t, int) and not isinstance(t, bool) for t in items):
            ids: list[int] = items  # type: ignore[assignment]
            bad = [t for t in ids if not 0 <= t < self.config.vocab_size]
            if bad:
                raise EngineRequestError(f"prompt: token id {bad[0]} is outside the vocabulary")
            return None, list(ids)
        raise EngineRequestError("prompt: must be a string, token ids or chat messages")

    def new_request_id(self) -> str:
        return f"req-{next(self._request_ids)}"

    def add_request(
        self, request_id: str, prompt: Prompt, params: SamplingParams | None = None
    ) -> None:
        """Queues a request of ``params.n`` sequences; its output comes from ``step``.

        Raises EngineRequestError for an empty or too long prompt, a token id outside the
        vocabulary or a request id in use; ChatTemplateError for messages it cannot render.
        """
        self._add(request_id, prompt, params or SamplingParams(), keep=False, sink=None)

    def _add(
        self, request_id: str, prompt: Prompt, params: SamplingParams, *, keep: bool,
        sink: deque[StreamDelta] | None,
    ) -> None:
        vocab = self.config.vocab_size
        bad_bias = [t for t in params.logit_bias if t >= vocab]
        if bad_bias:  # checked here: the sampler would fail the whole batch at step time
            raise EngineRequestError(
                f"logit_bias: token id {bad_bias[0]} is outside the vocabulary of {vocab}"
            )
        text, ids = self._encode(prompt)
        if not ids:
            raise EngineRequestError("prompt: encodes to no tokens")
        if len(ids) >= self.max_seq_len:
            raise EngineRequestError(
                f"prompt: {len(ids)} tokens leave no room to generate (limit {self.max_seq_len})"
            )
        req = _Request(request_id, text, ids, params, keep=keep, sink=sink)
        with self._lock:
            if request_id in self._requests:
                raise EngineRequestError(f"request_id: {request_id!r} is already in use")
            for index in range(params.n):
                sched = SchedSeq(next(self._seq_ids), list(ids))
                gen = make_generator(params.seed, index) if params.seed is not None else None
                detok = IncrementalDetokenizer(self.tokenizer, ids, params.skip_special_tokens)
                stop = (StopMatcher(params.stop, params.include_stop_str_in_output)
                        if params.stop else None)
                seq = _Seq(req, index, sched, gen, seed_value(params.seed, index), detok, stop,
                           logprobs=[] if params.logprobs is not None else None)
                req.seqs.append(seq)
            self._requests[request_id] = req
            for seq in req.seqs:
                self._seqs[seq.sched.seq_id] = seq
                self.scheduler.add(seq.sched)

    def abort(self, request_id: str) -> None:
        """Cancels a request; its blocks are freed before the next step (at once if idle).

        Its unfinished sequences end with finish_reason "abort" (reported by ``step``).
        Unknown or finished ids are ignored.
        """
        self._aborts.append((request_id, False))
        self._try_apply_aborts()

    def _discard(self, request_id: str) -> None:
        """Aborts a collected request if unfinished and forgets it (stream's cleanup)."""
        self._aborts.append((request_id, True))
        self._try_apply_aborts()

    def _try_apply_aborts(self) -> None:
        if self._lock.acquire(blocking=False):
            try:
                self._ready.extend(self._apply_aborts())
            finally:
                self._lock.release()

    def _apply_aborts(self) -> list[StreamDelta]:
        deltas: list[StreamDelta] = []
        while self._aborts:
            request_id, forget = self._aborts.popleft()
            req = self._requests.get(request_id)
            if req is None:
                continue
            for seq in req.seqs:
                if seq.finish_reason is None:
                    self.scheduler.abort(seq.sched.seq_id)
                    self._seqs.pop(seq.sched.seq_id, None)
                    seq.finish_reason = "abort"
                    delta = self._delta(seq)
                    if not forget:  # a discarded request's consumer is gone
                        deltas.append(delta)
            if forget:
                req.keep = False
                req.sink = None
            if not req.keep:
                del self._requests[request_id]
        return self._route(deltas)

    def has_unfinished(self) -> bool:
        """True while ``step`` has work to do or deltas (e.g. of an abort) to hand out."""
        return self.scheduler.has_unfinished() or bool(self._ready or self._aborts)

    @property
    def num_unfinished(self) -> int:
        return self.scheduler.num_unfinished

    # ---- one step ------------------------------------------------------------------------

    def step(self) -> list[StreamDelta]:
        """Runs one forward pass over the scheduled batch; returns the new deltas.

        Each delta carries new text/tokens of one sequence; a sequence's last delta has its
        finish_reason. Returns an empty list when there is nothing to do.
        """
        with self._lock:
            deltas, self._ready = self._ready, []
            deltas += self._apply_aborts()
            out = self.scheduler.schedule()
            if not out.is_empty:
                deltas += self._route(self._execute(out))
            deltas += self._apply_aborts()
            return deltas

    def _execute(self, out: SchedulerOutput) -> list[StreamDelta]:
        bs = self.block_size
        ids: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        starts = [0]
        seq_lens: list[int] = []
        q_lens: list[int] = []
        tables: list[list[int]] = []
        rows: list[int] = []  # index in the flattened batch of each sampled sequence's logits
        sampled: list[_Seq] = []
        for item in out.scheduled:
            s, start, n = item.seq, item.start, item.num_new_tokens
            end = start + n
            table = item.block_table
            if n == 1:
                ids.append(s.token_ids[start])
                positions.append(start)
                slots.append(table[start // bs] * bs + start % bs)
            else:
                ids.extend(s.token_ids[start:end])
                positions.extend(range(start, end))
                slots.extend([table[p // bs] * bs + p % bs for p in range(start, end)])
            starts.append(starts[-1] + n)
            q_lens.append(n)
            seq_lens.append(end)
            tables.append(table)
            if item.sample:
                rows.append(starts[-1] - 1)
                sampled.append(self._seqs[s.seq_id])
        width = max(len(t) for t in tables)
        dev = self.device
        meta = AttentionMetadata(
            slot_mapping=torch.tensor(slots, dtype=torch.int64, device=dev),
            query_start_loc=torch.tensor(starts, dtype=torch.int32, device=dev),
            seq_lens=torch.tensor(seq_lens, dtype=torch.int32, device=dev),
            block_tables=torch.tensor([t + [0] * (width - len(t)) for t in tables],
                                      dtype=torch.int32, device=dev),
            max_query_len=max(q_lens),
            max_seq_len=max(seq_lens),
            query_lens=q_lens,
            seq_lens_list=seq_lens,
        )
        with torch.inference_mode():
            hidden = self.model(
                torch.tensor(ids, dtype=torch.int64, device=dev),
                torch.tensor(positions, dtype=torch.int64, device=dev),
                self.kv_cache.layers, meta, self.backend,
            )  # [N, H]
            if not sampled:
                self.scheduler.postprocess(out, {})
                return []
            if len(rows) != hidden.shape[0]:
                hidden = hidden[torch.tensor(rows, dtype=torch.int64, device=dev)]
            logits = self.model.compute_logits(hidden)  # [M, V] float32
            params = [s.req.params for s in sampled]
            penalties = any(p.uses_penalties for p in params)
            result = self.sampler.sample(
                logits,
                params,
                [s.output_ids for s in sampled] if penalties else [()] * len(sampled),
                [s.generator for s in sampled],
                [s.req.prompt_ids for s in sampled] if penalties else None,
                streams=[(s.seed, len(s.output_ids)) for s in sampled]
                if self.sampler.kernel is not None else None,
            )
        tokens = result.token_id_list
        self.scheduler.postprocess(
            out, {s.sched.seq_id: t for s, t in zip(sampled, tokens, strict=True)}
        )
        deltas = []
        for seq, tok, lp in zip(sampled, tokens, result.logprobs, strict=True):
            self._accept(seq, tok, lp)
            deltas.append(self._delta(seq))
        return deltas

    def _accept(self, seq: _Seq, tok: int, lp: TokenLogprobs | None) -> None:
        """Applies the stop rules to a new token and updates the sequence's text."""
        p = seq.req.params
        seq.new_ids.append(tok)
        if seq.logprobs is not None and lp is not None:
            seq.logprobs.append(lp)
            seq.new_logprobs.append(lp)
        if tok in p.stop_token_ids:
            if p.include_stop_str_in_output:
                self._emit(seq, seq.detok.push(tok))
            self._finish(seq, "stop", tok)
            return
        if tok in self.eos_ids and not p.ignore_eos:
            self._finish(seq, "stop", None)
            return
        text = seq.detok.push(tok)
        if seq.stop is None:
            self._emit(seq, text)
        else:
            safe, hit = seq.stop.feed(text)
            self._emit(seq, safe)
            if hit:
                self._finish(seq, "stop", seq.stop.matched, flush=False)
                return
        if len(seq.output_ids) >= p.max_tokens or seq.sched.num_tokens >= self.max_seq_len:
            self._finish(seq, "length", None)

    def _emit(self, seq: _Seq, text: str) -> None:
        if text:
            seq.text.append(text)
            seq.new_text.append(text)

    def _finish(
        self, seq: _Seq, reason: FinishReason, stop_reason: str | int | None, flush: bool = True
    ) -> None:
        if flush:
            rest = seq.detok.flush()
            if seq.stop is not None:
                safe, hit = seq.stop.feed(rest)
                if hit:  # the last characters completed a stop string
                    reason, stop_reason = "stop", seq.stop.matched
                rest = safe + seq.stop.flush()
            self._emit(seq, rest)
        seq.finish_reason = reason
        seq.stop_reason = stop_reason
        self.scheduler.finish(seq.sched.seq_id)
        self._seqs.pop(seq.sched.seq_id, None)

    def _delta(self, seq: _Seq) -> StreamDelta:
        req = seq.req
        delta = StreamDelta(
            request_id=req.request_id,
            index=seq.index,
            text="".join(seq.new_text),
            token_ids=tuple(seq.new_ids),
            finish_reason=seq.finish_reason,
            stop_reason=seq.stop_reason,
            logprobs=tuple(seq.new_logprobs) if seq.logprobs is not None else None,
            usage=req.usage() if seq.finish_reason is not None and req.finished else None,
        )
        seq.new_ids, seq.new_text, seq.new_logprobs = [], [], []
        return delta

    def _route(self, deltas: list[StreamDelta]) -> list[StreamDelta]:
        """Hands deltas to stream sinks; forgets finished requests nobody collects."""
        for d in deltas:
            req = self._requests.get(d.request_id)
            if req is None:
                continue
            if req.sink is not None:
                req.sink.append(d)
            if d.usage is not None and not req.keep:
                del self._requests[d.request_id]
        return deltas

    # ---- high level ----------------------------------------------------------------------

    def _output(self, req: _Request) -> RequestOutput:
        return RequestOutput(
            request_id=req.request_id,
            prompt=req.prompt,
            prompt_token_ids=tuple(req.prompt_ids),
            outputs=tuple(
                CompletionOutput(
                    index=s.index,
                    text="".join(s.text),
                    token_ids=tuple(s.output_ids),
                    finish_reason=s.finish_reason,
                    stop_reason=s.stop_reason,
                    logprobs=tuple(s.logprobs) if s.logprobs is not None else None,
                )
                for s in req.seqs
            ),
            usage=req.usage(),
        )

    def generate(
        self,
        prompts: Prompt | Sequence[Prompt],
        params: SamplingParams | Sequence[SamplingParams] | None = None,
    ) -> list[RequestOutput]:
        """Generates for every prompt, batched; returns one RequestOutput per prompt, in order.

        A prompt is a string, a list of token ids or a list of chat messages; a single prompt
        may be passed bare. ``params`` is one SamplingParams for all or one per prompt.
        Raises EngineRequestError for a prompt it cannot accept (nothing is generated then).
        """
        if isinstance(prompts, str) or (
            isinstance(prompts, Sequence) and prompts and not isinstance(prompts[0], str | list
                                                                          | tuple)
        ):
            batch: list[Prompt] = [prompts]  # type: ignore[list-item]
        else:
            batch = list(prompts)  # type: ignore[arg-type]
        if params is None or isinstance(params, SamplingParams):
            plist = [params or SamplingParams()] * len(batch)
        else:
            plist = list(params)
            if len(plist) != len(batch):
                raise ValueError(f"params: expected {len(batch)}, got {len(plist)}")
        rids: list[str] = []
        try:
            for prompt, p in zip(batch, plist, strict=True):
                rid = self.new_request_id()
                self._add(rid, prompt, p, keep=True, sink=None)
                rids.append(rid)
            reqs = [self._requests[r] for r in rids]
            while not all(r.finished for r in reqs):
                self.step()
            return [self._output(r) for r in reqs]
        finally:
            for rid in rids:
                self._discard(rid)

    def chat(
        self, messages: Sequence[Mapping[str, Any]], params: SamplingParams | None = None
    ) -> RequestOutput:
        """Generates the assistant's reply to ``messages`` through the chat template.

        Raises ChatTemplateError if the messages cannot be rendered.
        """
        return self.generate([list(messages)], params)[0]

    async def stream(
        self,
        prompt: Prompt,
        params: SamplingParams | None = None,
        *,
        request_id: str | None = None,
    ) -> AsyncIterator[StreamDelta]:
        """Yields the deltas of one request as they are generated (anyio, asyncio or trio).

        Steps run in worker threads; closing or cancelling the iterator aborts the request,
        which frees its blocks within one step. Raises EngineRequestError like add_request.
        """
        import anyio.to_thread  # only streaming needs anyio

        params = params or SamplingParams()
        rid = request_id or self.new_request_id()
        sink: deque[StreamDelta] = deque()

        def add() -> None:
            self._add(rid, prompt, params, keep=True, sink=sink)

        def pump() -> None:
            if not sink:
                self.step()

        await anyio.to_thread.run_sync(add)
        remaining = params.n
        try:
            while remaining:
                while sink:
                    delta = sink.popleft()
                    if delta.finish_reason is not None:
                        remaining -= 1
                    yield delta
                if remaining:
                    await anyio.to_thread.run_sync(pump)
        finally:
            self._discard(rid)

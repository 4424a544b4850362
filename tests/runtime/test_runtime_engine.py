"""The engine on the tiny model: batching, sampling, stopping, cancellation, streaming, chat."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from pathlib import Path

import anyio
import pytest

from resultity_runtime import Engine, EngineRequestError, SamplingParams, StreamDelta

PROMPTS = [
    "Hello",
    "The network signs a snapshot and every node verifies it before it applies the config.",
    "a b c",
    "Runtime streams tokens back to the Agent, which signs a receipt for the credits.",
]
GREEDY = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)


@pytest.fixture(scope="module")
def engine(tiny_model_dir: Path) -> Engine:
    return Engine.from_pretrained(
        tiny_model_dir, device="cpu", kv_cache_bytes=8 << 20, block_size=8
    )


@pytest.fixture(scope="module")
def solo(engine: Engine) -> list[tuple[int, ...]]:
    """Greedy tokens of each prompt generated alone."""
    return [engine.generate(p, GREEDY)[0].token_ids for p in PROMPTS]


def _all_free(engine: Engine) -> bool:
    bm = engine.scheduler.block_manager
    return bm.num_free_blocks == bm.num_blocks and not engine.has_unfinished()


def test_batched_greedy_matches_one_at_a_time(engine: Engine, solo: list[tuple[int, ...]]) -> None:
    # mixed lengths, two prompts longer than a block of 8
    assert len(engine.tokenizer.encode(PROMPTS[1])) > 16
    hits = engine.scheduler.block_manager.hit_tokens
    outs = engine.generate(PROMPTS, GREEDY)
    assert [o.token_ids for o in outs] == solo
    # the long prompts were served partly from the prefix cache the solo runs filled
    assert engine.scheduler.block_manager.hit_tokens > hits
    assert all(o.finish_reason == "length" and len(o.token_ids) == 12 for o in outs)
    assert len({o.request_id for o in outs}) == len(PROMPTS)
    assert outs[0].usage.prompt_tokens == len(outs[0].prompt_token_ids)
    assert outs[0].usage.completion_tokens == 12
    assert outs[0].text.strip() == engine.tokenizer.decode(list(outs[0].token_ids)).strip()
    assert _all_free(engine)
    assert not engine._requests


def test_chunked_prefill_and_tiny_budget_give_the_same_tokens(
    tiny_model_dir: Path, solo: list[tuple[int, ...]]
) -> None:
    # 6 tokens per step: long prompts are prefilled in chunks next to running decodes
    small = Engine.from_pretrained(
        tiny_model_dir,
        kv_cache_bytes=8 << 20,
        block_size=4,
        max_num_seqs=4,
        max_num_batched_tokens=6,
        enable_prefix_caching=False,
    )
    assert [o.token_ids for o in small.generate(PROMPTS, GREEDY)] == solo


def test_pool_exhaustion_waits_or_preempts_and_still_matches(
    tiny_model_dir: Path, solo: list[tuple[int, ...]]
) -> None:
    # 10 blocks of 4 tokens = 40 slots: the four requests need ~90 at once
    per_block = 2 * 4 * 2 * 64 * 4 * 4  # layers * K/V * kv heads * head_dim * fp32 * block
    tight = Engine.from_pretrained(tiny_model_dir, kv_cache_bytes=10 * per_block, block_size=4)
    assert tight.kv_cache.num_blocks == 10
    preempted = 0
    for i, p in enumerate(PROMPTS):
        tight.add_request(f"r{i}", p, GREEDY)
    tokens: dict[str, list[int]] = {f"r{i}": [] for i in range(len(PROMPTS))}
    finished = set()
    for _ in range(500):
        if not tight.has_unfinished():
            break
        before = {s.seq_id: s.num_preemptions for s in tight.scheduler.running}
        for d in tight.step():
            tokens[d.request_id] += d.token_ids
            if d.finished:
                finished.add(d.request_id)
        preempted += sum(1 for s in tight.scheduler.waiting if s.seq_id in before)
        bm = tight.scheduler.block_manager
        assert bm.num_free_blocks + sum(len(t) for t in bm.tables().values()) >= bm.num_blocks
    assert finished == set(tokens)
    assert [tuple(tokens[f"r{i}"]) for i in range(len(PROMPTS))] == solo
    assert preempted > 0
    assert _all_free(tight)
    assert not tight._requests  # low-level requests are forgotten once finished


def test_seeded_sampling_is_reproducible_alone_and_batched(engine: Engine) -> None:
    seeded = SamplingParams(max_tokens=10, temperature=0.9, top_k=50, seed=1234, ignore_eos=True)
    alone = engine.generate(PROMPTS[1], seeded)[0].token_ids
    again = engine.generate(PROMPTS[1], seeded)[0].token_ids
    other = SamplingParams(max_tokens=10, temperature=1.0, seed=99, ignore_eos=True)
    batch = engine.generate([PROMPTS[0], PROMPTS[1], PROMPTS[2]], [other, seeded, other])
    assert alone == again == batch[1].token_ids
    different = engine.generate(
        PROMPTS[1],
        SamplingParams(max_tokens=10, temperature=0.9, top_k=50, seed=1235, ignore_eos=True),
    )[0].token_ids
    assert different != alone


def test_n_sequences_are_independent_and_seeded(engine: Engine) -> None:
    params = SamplingParams(max_tokens=8, temperature=1.0, seed=7, n=3, ignore_eos=True)
    out = engine.generate(PROMPTS[0], params)[0]
    assert [o.index for o in out.outputs] == [0, 1, 2]
    assert len({o.token_ids for o in out.outputs}) == 3
    assert out.usage.completion_tokens == 24
    one = engine.generate(
        PROMPTS[0], SamplingParams(max_tokens=8, temperature=1.0, seed=7, ignore_eos=True)
    )[0]
    assert out.outputs[0].token_ids == one.token_ids


def test_stop_strings_are_never_leaked_in_the_stream(engine: Engine) -> None:
    free = SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True)

    async def collect_free() -> list[StreamDelta]:
        return [d async for d in engine.stream(PROMPTS[1], free)]

    pieces = [d.text for d in anyio.run(collect_free)]
    text = "".join(pieces)
    assert text == engine.generate(PROMPTS[1], free)[0].text
    # a stop string spanning a token boundary, well inside the output
    k = next(k for k in range(3, 20) if pieces[k] and pieces[k + 1])
    stop = pieces[k][-1] + pieces[k + 1][0]
    expected = text[: text.index(stop)]
    params = SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True, stop=(stop,))

    async def collect() -> list[StreamDelta]:
        return [d async for d in engine.stream(PROMPTS[1], params)]

    deltas = anyio.run(collect)
    streamed = ""
    for d in deltas:
        streamed += d.text
        assert stop not in streamed
    assert streamed == expected
    assert deltas[-1].finish_reason == "stop"
    assert deltas[-1].stop_reason == stop
    assert deltas[-1].usage is not None
    assert all(d.finish_reason is None for d in deltas[:-1])
    out = engine.generate(PROMPTS[1], params)[0]
    assert out.text == expected
    assert _all_free(engine)


def test_eos_and_stop_token_ids(engine: Engine) -> None:
    eos = engine.tokenizer.eos_ids[0]
    forced = {eos: 100.0}
    out = engine.generate(
        PROMPTS[0], SamplingParams(max_tokens=5, temperature=0.0, logit_bias=forced)
    )[0]
    assert out.token_ids == (eos,)
    assert out.finish_reason == "stop"
    assert out.text == ""
    ignored = engine.generate(
        PROMPTS[0],
        SamplingParams(max_tokens=5, temperature=0.0, logit_bias=forced, ignore_eos=True),
    )[0]
    assert ignored.token_ids == (eos,) * 5
    assert ignored.finish_reason == "length"
    greedy = engine.generate(PROMPTS[0], GREEDY)[0].token_ids
    stopped = engine.generate(
        PROMPTS[0],
        SamplingParams(
            max_tokens=12, temperature=0.0, ignore_eos=True, stop_token_ids=(greedy[3],)
        ),
    )[0]
    k = greedy.index(greedy[3])
    assert stopped.token_ids == greedy[: k + 1]
    assert stopped.stop_reason == greedy[3]
    assert stopped.finish_reason == "stop"


def test_logprobs_are_passed_through(engine: Engine) -> None:
    out = engine.generate(
        PROMPTS[0], SamplingParams(max_tokens=4, temperature=0.0, logprobs=3, ignore_eos=True)
    )[0]
    assert out.logprobs is not None
    assert [lp.token_id for lp in out.logprobs] == list(out.token_ids)
    assert all(len(lp.top) == 3 and lp.rank == 1 for lp in out.logprobs)
    assert all(lp.top[0][0] == lp.token_id for lp in out.logprobs)
    assert engine.generate(PROMPTS[0], GREEDY)[0].logprobs is None


def test_abort_frees_blocks_within_one_step(engine: Engine) -> None:
    bm = engine.scheduler.block_manager
    long = SamplingParams(max_tokens=200, temperature=0.0, ignore_eos=True)
    engine.add_request("keep", PROMPTS[1], long)
    engine.add_request("drop", PROMPTS[3], long)
    for _ in range(3):
        engine.step()
    owned_before = len(bm.tables())
    assert owned_before == 2
    engine.abort("drop")  # no step running: applied at once
    assert len(bm.tables()) == 1
    assert engine.has_unfinished()
    deltas = engine.step()
    final = [d for d in deltas if d.request_id == "drop"]
    assert len(final) == 1
    assert final[0].finish_reason == "abort"
    assert final[0].usage is not None
    # an abort while another thread holds the step lock is applied when that step ends
    with engine._lock:
        engine.abort("keep")
        assert len(bm.tables()) == 1
    assert any(d.request_id == "keep" and d.finish_reason == "abort" for d in engine.step())
    assert _all_free(engine)
    assert not engine._requests
    engine.abort("unknown")  # ignored


def test_stream_under_anyio_and_cancellation_aborts(engine: Engine) -> None:
    params = SamplingParams(max_tokens=10, temperature=0.0, ignore_eos=True)
    expected = engine.generate(PROMPTS[2], params)[0]

    async def full() -> list[StreamDelta]:
        return [d async for d in engine.stream(PROMPTS[2], params)]

    deltas = anyio.run(full)
    assert tuple(t for d in deltas for t in d.token_ids) == expected.token_ids
    assert "".join(d.text for d in deltas) == expected.text
    assert deltas[-1].finish_reason == "length"

    seen: list[StreamDelta] = []
    loop_ticks = 0

    async def cancelled() -> None:
        nonlocal loop_ticks
        long = SamplingParams(max_tokens=500, temperature=0.0, ignore_eos=True)

        async def consume() -> None:
            async for d in engine.stream(PROMPTS[1], long, request_id="s1"):
                seen.append(d)
                if len(seen) == 3:
                    tg.cancel_scope.cancel()

        async def ticker() -> None:  # the event loop keeps running while steps run
            nonlocal loop_ticks
            while True:
                loop_ticks += 1
                await anyio.sleep(0)

        async with anyio.create_task_group() as tg:
            tg.start_soon(consume)
            tg.start_soon(ticker)

    anyio.run(cancelled)
    assert len(seen) == 3
    assert loop_ticks > 3
    assert _all_free(engine)
    assert "s1" not in engine._requests

    async def concurrent() -> list[list[StreamDelta]]:
        results: list[list[StreamDelta]] = [[] for _ in PROMPTS]

        async def one(i: int) -> None:
            async for d in engine.stream(PROMPTS[i], GREEDY):
                results[i].append(d)

        async with anyio.create_task_group() as tg:
            for i in range(len(PROMPTS)):
                tg.start_soon(one, i)
        return results

    results = anyio.run(concurrent)
    batched = engine.generate(PROMPTS, GREEDY)
    assert [tuple(t for d in r for t in d.token_ids) for r in results] == [
        o.token_ids for o in batched
    ]
    assert _all_free(engine)


def test_chat_applies_the_template(engine: Engine) -> None:
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    out = engine.chat(messages, GREEDY)
    ids = engine.tokenizer.encode_chat(messages)
    assert list(out.prompt_token_ids) == ids
    assert ids.count(engine.tokenizer.bos_id) == 1
    assert out.prompt is not None
    assert out.prompt.endswith("<|im_start|>assistant\n")
    assert out.token_ids == engine.generate([ids], GREEDY)[0].token_ids


def test_bad_requests_are_refused(engine: Engine) -> None:
    with pytest.raises(EngineRequestError, match="prompt"):
        engine.generate([[]], GREEDY)
    with pytest.raises(EngineRequestError, match="vocabulary"):
        engine.generate([[1, 10**6]], GREEDY)
    with pytest.raises(EngineRequestError, match="no room"):
        engine.generate([[5] * engine.max_seq_len], GREEDY)
    with pytest.raises(EngineRequestError, match="logit_bias"):
        engine.add_request("bias", "x", SamplingParams(logit_bias={10**6: 1.0}))
    engine.add_request("dup", "x", GREEDY)
    with pytest.raises(EngineRequestError, match="in use"):
        engine.add_request("dup", "y", GREEDY)
    engine.abort("dup")
    assert [(d.request_id, d.finish_reason) for d in engine.step()] == [("dup", "abort")]
    assert _all_free(engine)


def test_prompt_at_the_context_limit_stops_with_length(tiny_model_dir: Path) -> None:
    small = Engine.from_pretrained(tiny_model_dir, kv_cache_bytes=4 << 20, max_model_len=20)
    out = small.generate(
        [[5] * 17], SamplingParams(max_tokens=50, temperature=0.0, ignore_eos=True)
    )[0]
    assert len(out.token_ids) == 3
    assert out.finish_reason == "length"


def test_steps_from_many_threads_are_safe(engine: Engine, solo: list[tuple[int, ...]]) -> None:
    results: dict[int, tuple[int, ...]] = {}

    def worker(i: int) -> None:
        results[i] = engine.generate(PROMPTS[i], GREEDY)[0].token_ids

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(len(PROMPTS))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert [results[i] for i in range(len(PROMPTS))] == solo
    assert _all_free(engine)


def test_kv_cache_is_planned_from_the_budget(engine: Engine) -> None:
    import torch

    from resultity_runtime._kv_cache import bytes_per_block, plan_num_blocks

    cfg = engine.config
    per = bytes_per_block(cfg, 8, torch.float32)
    assert per == 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * cfg.head_dim * 8 * 4
    assert engine.kv_cache.num_blocks == (8 << 20) // per
    assert engine.kv_cache.nbytes == engine.kv_cache.num_blocks * per
    k, v = engine.kv_cache.layers[1]
    assert k.shape == (engine.kv_cache.num_blocks, 8, cfg.num_key_value_heads, cfg.head_dim)
    assert k.is_contiguous()
    assert v.data_ptr() == k.data_ptr() + k.numel() * 4
    cpu = torch.device("cpu")
    with pytest.raises(ValueError, match="below one block"):
        plan_num_blocks(cfg, 8, torch.float32, cpu, kv_cache_bytes=per - 1)
    # from free memory: capped at what max_useful_tokens can ever use
    assert plan_num_blocks(cfg, 8, torch.float32, cpu, max_useful_tokens=80) == 10


def test_public_names_resolve() -> None:
    import resultity_runtime

    for name in resultity_runtime.__all__:
        assert getattr(resultity_runtime, name) is not None
    with pytest.raises(AttributeError):
        _ = resultity_runtime.NoSuchName  # type: ignore[attr-defined]


_TRITON_CHECK = """
import sys
from resultity_runtime import Engine, SamplingParams
torch_e = Engine.from_pretrained(sys.argv[1], kv_cache_bytes=4 << 20, block_size=8,
                                 max_num_batched_tokens=64, backend="torch")
tri = Engine(torch_e.model, torch_e.config, torch_e.tokenizer, kv_cache_bytes=4 << 20,
             block_size=8, max_num_batched_tokens=64, backend="triton")
assert tri.backend.name == "triton"
params = SamplingParams(max_tokens=5, temperature=0.0, ignore_eos=True)
prompts = sys.argv[2:]
def run(engine):
    first = engine.generate(prompts[:1], params)  # its blocks are then cached
    return [o.token_ids for o in first + engine.generate(prompts[1:], params)]
want = run(torch_e)
got = run(tri)
assert got == want, (got, want)
assert tri.scheduler.block_manager.hit_tokens > 0
"""


@pytest.mark.slow
def test_triton_backend_matches_torch_under_the_interpreter(tiny_model_dir: Path) -> None:
    pytest.importorskip("triton")
    # TRITON_INTERPRET must be set before triton compiles anything: use a fresh process.
    # prefill, chunked prefill over a cached prefix (the repeat), mixed prefill + decode steps
    prompts = [PROMPTS[1], PROMPTS[2], PROMPTS[1] + " again"]
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    subprocess.run([sys.executable, "-c", _TRITON_CHECK, str(tiny_model_dir), *prompts],
                   check=True, env=env, timeout=300)

"""RuntimeSupervisor against a fake Runtime child (crash, hang, garbage) and the real one."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import anyio
import pytest

from resultity_servers.node import (
    Generate,
    LoadModel,
    RuntimeFailedError,
    RuntimeJobError,
    RuntimeSpec,
    RuntimeSupervisor,
    TokenEvent,
)

FAKE = Path(__file__).with_name("test_servers_node_fakeruntime.py")
pytestmark = pytest.mark.anyio


def fake_spec(tmp_path: Path, mode: str, **kw: object) -> RuntimeSpec:
    options: dict[str, object] = {
        "health_interval_s": 0.2, "health_timeout_s": 0.5, "backoff_initial_s": 0.05,
        "backoff_max_s": 0.2, "start_timeout_s": 10.0, "load_timeout_s": 10.0,
    }
    options.update(kw)
    return RuntimeSpec(
        workdir=tmp_path / "work",
        command=(sys.executable, str(FAKE), mode, str(tmp_path / "fake.log")),
        **options,  # type: ignore[arg-type]
    )


def log_lines(tmp_path: Path, prefix: str) -> list[str]:
    path = tmp_path / "fake.log"
    lines = path.read_text().splitlines() if path.exists() else []
    return [line for line in lines if line.startswith(prefix)]


@asynccontextmanager
async def supervised(spec: RuntimeSpec, *, ready: bool = True) -> AsyncIterator[RuntimeSupervisor]:
    sup = RuntimeSupervisor(spec, LoadModel("echo", "/nowhere"))
    async with anyio.create_task_group() as tg:
        tg.start_soon(sup.run)
        if ready:
            await sup.wait_ready(10)
        yield sup
        tg.cancel_scope.cancel()


async def collect(sup: RuntimeSupervisor, job_id: str, prompt: str, max_tokens: int
                  ) -> list[TokenEvent]:
    frame = Generate(job_id, prompt, None, {"max_tokens": max_tokens})
    with anyio.fail_after(10):
        return [event async for event in sup.generate(frame)]


async def wait_for(condition: object, timeout: float = 5.0) -> None:
    with anyio.fail_after(timeout):
        while not condition():  # type: ignore[operator]
            await anyio.sleep(0.02)


async def test_streams_a_job_and_clears_the_environment(tmp_path: Path) -> None:
    async with supervised(fake_spec(tmp_path, "ok")) as sup:
        events = await collect(sup, "j1", "hello world", 3)
        assert "".join(e.text for e in events) == "hello world hello"
        assert events[-1].finish_reason == "length"
        assert events[-1].usage == {"prompt_tokens": 2, "completion_tokens": 3}
        assert sup.sandbox == {"fake": True}
        assert sup.active_jobs == 0
    (start,) = log_lines(tmp_path, "start")
    _, _pid, home, env = start.split(" ", 3)
    assert home == str(tmp_path / "work")
    assert set(json.loads(env)) <= {"HOME", "LANG", "PATH", "PYTHONNOUSERSITE", "PYTHONPATH",
                              "PYTHONUNBUFFERED", "TMPDIR"}
    assert oct((tmp_path / "work").stat().st_mode & 0o777) == "0o700"


async def test_abort_reaches_the_child_and_ends_the_stream(tmp_path: Path) -> None:
    async with supervised(fake_spec(tmp_path, "ok")) as sup:
        frame = Generate("long", "a b c", None, {"max_tokens": 10_000})
        events = []
        with anyio.fail_after(10):
            async for event in sup.generate(frame):
                events.append(event)
                if len(events) == 3:
                    await sup.abort("long")
        assert events[-1].finish_reason == "abort"
        assert events[-1].usage is not None
        assert events[-1].usage["completion_tokens"] < 100
    assert log_lines(tmp_path, "abort") == ["abort long"]


async def test_leaving_a_stream_early_aborts_the_job(tmp_path: Path) -> None:
    async with supervised(fake_spec(tmp_path, "ok")) as sup:
        frame = Generate("early", "a b", None, {"max_tokens": 10_000})
        async for _event in sup.generate(frame):
            break
        await wait_for(lambda: log_lines(tmp_path, "abort") == ["abort early"])
        assert sup.active_jobs == 0
        assert len(await collect(sup, "next", "x", 2)) == 2


async def test_crash_before_output_is_retried_on_the_restarted_child(tmp_path: Path) -> None:
    async with supervised(fake_spec(tmp_path, "crash_once")) as sup:
        events = await collect(sup, "j1", "one two", 2)
        assert "".join(e.text for e in events) == "one two"
        assert sup.restarts == 1
        assert sup.state == "ready"
    assert log_lines(tmp_path, "generate") == ["generate j1", "generate j1"]
    assert len(log_lines(tmp_path, "start")) == 2


async def test_crash_mid_stream_fails_the_job_and_restarts(tmp_path: Path) -> None:
    async with supervised(fake_spec(tmp_path, "crash_midstream")) as sup:
        with pytest.raises(RuntimeJobError, match="mid-stream") as info:
            await collect(sup, "j1", "one two", 5)
        assert not info.value.retryable
        await sup.wait_ready(10)
        assert sup.restarts >= 1


async def test_a_job_that_always_crashes_the_child_gives_up(tmp_path: Path) -> None:
    async with supervised(fake_spec(tmp_path, "crash_always", max_job_retries=1)) as sup:
        with pytest.raises(RuntimeJobError, match="runtime died") as info:
            await collect(sup, "poison", "x", 2)
        assert info.value.retryable
    assert log_lines(tmp_path, "generate") == ["generate poison"] * 2


async def test_a_refused_job_does_not_restart_the_child(tmp_path: Path) -> None:
    async with supervised(fake_spec(tmp_path, "ok")) as sup:
        with pytest.raises(RuntimeJobError, match="refused by the fake"):
            await collect(sup, "bad", "an error here", 2)
        assert sup.restarts == 0
        assert len(await collect(sup, "good", "fine", 1)) == 1


@pytest.mark.parametrize(
    ("mode", "why"),
    [("hang", "no pong"), ("garbage", "bad frame"), ("oversize", "frame limit")],
)
async def test_a_broken_child_is_killed_and_restarted(tmp_path: Path, mode: str, why: str
                                                      ) -> None:
    async with supervised(fake_spec(tmp_path, mode), ready=False) as sup:
        first = sup.pid
        await wait_for(lambda: sup.restarts >= 1, timeout=10)
        assert why in (sup.last_error or "")
        await wait_for(lambda: len(log_lines(tmp_path, "start")) >= 2, timeout=10)
    if first is not None:  # the killed child is gone, not orphaned
        with pytest.raises(ProcessLookupError):
            os.kill(first, 0)


async def test_a_child_that_cannot_load_is_never_ready(tmp_path: Path) -> None:
    async with supervised(fake_spec(tmp_path, "bad_load"), ready=False) as sup:
        with pytest.raises(RuntimeFailedError, match="no such model"):
            await sup.wait_ready(1.5)
        assert sup.restarts >= 1


async def test_a_job_waits_for_a_child_that_starts_late(tmp_path: Path) -> None:
    spec = fake_spec(tmp_path, "ok")
    sup = RuntimeSupervisor(spec, LoadModel("echo", "/nowhere"))
    async with anyio.create_task_group() as tg:
        results: list[list[TokenEvent]] = []

        async def job() -> None:
            results.append(await collect(sup, "early", "x y", 2))

        tg.start_soon(job)
        await anyio.sleep(0.05)
        tg.start_soon(sup.run)
        await wait_for(lambda: bool(results), timeout=10)
        tg.cancel_scope.cancel()
    assert "".join(e.text for e in results[0]) == "x y"


def test_confine_removes_network_access(tmp_path: Path) -> None:
    server = socket.create_server(("127.0.0.1", 0))
    port = server.getsockname()[1]
    code = (
        "import socket, resource\n"
        "from resultity_servers.node import SandboxLimits, confine\n"
        "report = confine(SandboxLimits(max_open_files=64))\n"
        "assert resource.getrlimit(resource.RLIMIT_NOFILE)[0] == 64, report\n"
        "assert resource.getrlimit(resource.RLIMIT_CORE)[0] == 0, report\n"
        "if not report['network_namespace']:\n"
        "    raise SystemExit(3)\n"
        f"s = socket.socket(); s.settimeout(2)\n"
        f"try:\n    s.connect(('127.0.0.1', {port}))\nexcept OSError:\n    raise SystemExit(0)\n"
        "raise SystemExit(1)\n"
    )
    try:
        result = subprocess.run([sys.executable, "-c", code], timeout=30, check=False,
                                capture_output=True, text=True)
    finally:
        server.close()
    if result.returncode == 3:
        pytest.skip("this platform allows no network namespace")
    assert result.returncode == 0, result.stderr


@pytest.mark.slow
async def test_the_real_runtime_child_generates_like_the_engine(tmp_path: Path) -> None:
    from resultity_runtime import Engine, SamplingParams, init_model_dir

    model = init_model_dir(tmp_path / "tiny", "tiny", seed=0)
    spec = RuntimeSpec(workdir=tmp_path / "work", threads=1, health_interval_s=1.0,
                       start_timeout_s=60, load_timeout_s=120)
    load = LoadModel("tiny", str(model), kv_cache_bytes=8 << 20, max_num_seqs=4,
                     max_model_len=256)
    sup = RuntimeSupervisor(spec, load)
    async with anyio.create_task_group() as tg:
        tg.start_soon(sup.run)
        await sup.wait_ready(120)
        frame = Generate("g", "The network", None,
                         {"max_tokens": 8, "temperature": 0, "logprobs": 1})
        with anyio.fail_after(60):
            events = [e async for e in sup.generate(frame)]
        sandbox, max_seq_len = sup.sandbox, sup.max_seq_len
        tg.cancel_scope.cancel()
    # one thread like the child: with more, the math library may pick another reduction
    # order under load, and the random tiny model has near-ties that greedy decoding flips
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        engine = Engine.from_pretrained(model, kv_cache_bytes=8 << 20, max_num_seqs=4,
                                        max_model_len=256)
        expected = engine.generate("The network",
                                   SamplingParams(max_tokens=8, temperature=0))[0]
    finally:
        torch.set_num_threads(threads)
    assert "".join(e.text for e in events) == expected.text
    assert [t for e in events for t in e.token_ids] == list(expected.token_ids)
    assert events[-1].usage == {"prompt_tokens": expected.usage.prompt_tokens,
                                "completion_tokens": expected.usage.completion_tokens}
    logprobs = [lp for e in events for lp in e.logprobs or []]
    assert len(logprobs) == len(expected.token_ids)
    assert all(float(lp["logprob"]) <= 0 and len(lp["top_logprobs"]) == 1 for lp in logprobs)
    assert max_seq_len == 256
    assert sandbox["max_open_files"] == 256
    assert sandbox["core_dumps"] is False


async def test_abort_without_a_child_does_not_raise(tmp_path: Path) -> None:
    sup = RuntimeSupervisor(fake_spec(tmp_path, "ok"))
    await sup.abort("nothing", force=True)
    await sup.abort("nothing")
    assert sup.state == "stopped"


def test_confine_hides_secrets_and_protects_the_data_dir(tmp_path: Path) -> None:
    data = tmp_path / "data"
    (data / "runtime" / "work").mkdir(parents=True)
    (data / "node.key").write_text("secret seed")
    (data / "installed.bin").write_text("model")
    code = (
        "import errno, json, sys\n"
        "from resultity_servers.node import SandboxLimits, confine\n"
        f"data = {str(data)!r}\n"
        "report = confine(SandboxLimits(network_namespace=False, readonly_paths=(data,),\n"
        "    writable_paths=(data + '/runtime/work',), hidden_paths=(data + '/node.key',)))\n"
        "if not report['hidden_paths']:\n"
        "    raise SystemExit(3)\n"
        "out = {'key': open(data + '/node.key').read(), 'report': report}\n"
        "try:\n    open(data + '/installed.bin', 'w')\nexcept OSError as e:\n"
        "    out['write_data'] = e.errno == errno.EROFS\n"
        "open(data + '/runtime/work/scratch', 'w').write('ok')\n"
        "print(json.dumps(out))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], timeout=30, check=False,
                            capture_output=True, text=True)
    if result.returncode == 3:
        pytest.skip("this platform allows no private mount namespace")
    assert result.returncode == 0, result.stderr
    out = json.loads(result.stdout)
    assert out["key"] == ""
    assert out["write_data"] is True
    assert (data / "runtime" / "work" / "scratch").read_text() == "ok"
    assert (data / "node.key").read_text() == "secret seed"  # only hidden inside the child
    assert (data / "installed.bin").read_text() == "model"
    assert out["report"]["readonly_paths"] == [str(data)]


def test_the_runtime_inbox_reads_whole_frames_and_reports_a_bad_one() -> None:
    # The Runtime's main loop reads the pipe itself (no reader thread): a frame written in
    # pieces arrives whole in one receive, nothing waits when nothing came, and a bad frame
    # ends the loop with a fatal error frame to the Agent.
    import threading

    from resultity_servers.node._frames import ErrorFrame, FrameDecoder, Ping, encode_frame
    from resultity_servers.node._runtime_main import _Inbox, _Writer

    rd, wr = os.pipe()
    out_rd, out_wr = os.pipe()
    with os.fdopen(out_wr, "wb", buffering=0) as out:
        inbox = _Inbox(rd, _Writer(out))
        try:
            assert inbox.receive(wait=False) == []
            big = Generate("job-1", "x" * 200_000, None, {"max_tokens": 1})
            frames = encode_frame(big, max_frame=1 << 24) + encode_frame(Ping(7))

            def write_in_pieces() -> None:
                for start in range(0, len(frames), 50_000):
                    os.write(wr, frames[start:start + 50_000])

            thread = threading.Thread(target=write_in_pieces)
            thread.start()
            got = inbox.receive(wait=True)
            assert got[:1] == [big]  # not one piece per receive (per engine step)
            thread.join()
            got += inbox.receive(wait=False)
            assert got == [big, Ping(7)]
            os.write(wr, b"\x00\x00\x00\x02{]")
            assert inbox.receive(wait=True) == [None]
            [error] = FrameDecoder().feed(os.read(out_rd, 65536))
            assert isinstance(error, ErrorFrame)
            assert error.fatal
            assert "bad frame" in error.message
        finally:
            os.close(wr)
    try:
        assert inbox.receive(wait=True) == [None]  # the Agent closed the pipe
    finally:
        os.close(rd)
        os.close(out_rd)

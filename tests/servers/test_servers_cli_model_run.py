"""``resultity model run``: a local model directory answers from the shell."""

from __future__ import annotations

import io
from pathlib import Path

import pytest

from resultity_runtime._demo_corpus import demo_model_path
from resultity_servers.cli import main

DEMO = str(demo_model_path())


def test_run_streams_the_demo_answer_and_reports_speed(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["model", "run", DEMO, "What is Resultity?", "--max-tokens", "24",
                 "--threads", "1"]) == 0
    out, err = capsys.readouterr()
    assert out.startswith("Resultity is a public inference network.")
    assert "loaded" in err
    assert "float32, no quantization, cpu, 1 threads" in err
    assert "24 tokens (length); first token after" in err
    assert "tokens/s after the first" in err


def test_run_int4_and_raw_prompt_from_stdin(capsys: pytest.CaptureFixture[str],
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("sys.stdin", io.StringIO("What is Resultity?"))
    assert main(["model", "run", DEMO, "-", "--quantization", "int4", "--max-tokens", "40"]) == 0
    out, err = capsys.readouterr()
    assert "bfloat16, int4" in err
    assert "public inference network" in out
    # --raw: the prompt is completed as text, not answered through the chat template
    assert main(["model", "run", DEMO, "Resultity is a public", "--raw", "--max-tokens",
                 "3"]) == 0
    raw, _ = capsys.readouterr()
    assert not raw.startswith("Resultity is")


@pytest.mark.parametrize(
    ("argv", "message", "status"),
    [
        (["/nonexistent/model", "hi"], "/nonexistent/model: not a directory", 1),
        ([DEMO, "hi", "--dtype", "float32", "--quantization", "int4"],
         "quantization: int4 needs dtype bfloat16", 2),
        ([DEMO, "hi", "--max-tokens", "0"], "--max-tokens must be at least 1", 2),
        ([DEMO, "  "], "PROMPT is empty", 2),
        ([DEMO, "hi", "--temperature", "-1"], "temperature", 2),
    ],
)
def test_run_refuses_bad_input_in_one_line(argv: list[str], message: str, status: int,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["model", "run", *argv]) == status
    err = capsys.readouterr().err
    assert message in err
    assert "Traceback" not in err
    assert len(err.strip().splitlines()) == 1


def test_run_help_explains_the_choices(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["model", "run", "--help"])
    text = capsys.readouterr().out
    assert "--quantization {none,int4}" in text
    assert "standard input" in text
    assert Path(DEMO).is_dir()

"""The `resultity keys`, `trust` and `snapshot` commands, in process and once as a subprocess."""

from __future__ import annotations

import json
import stat
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from resultity_core import (
    Envelope,
    NodeConfig,
    TrustRoot,
    load_key_file,
    load_trusted_root,
    node_config_hash,
    rotate_root,
)
from resultity_servers.cli import main

NOW = 1_700_000_000
DAY = 86_400


def run(capsys: pytest.CaptureFixture[str], *argv: Any) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def one_line_error(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("resultity: error: ")
    assert "Traceback" not in err
    return lines[0]


@pytest.fixture
def keys(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> dict[str, Path]:
    out = {}
    for name in ("root", "root2", "cfg", "cfg2", "rel", "net", "other"):
        path = tmp_path / f"{name}.key"
        assert run(capsys, "keys", "generate", path)[0] == 0
        out[name] = path
    return out


@pytest.fixture
def trust(tmp_path: Path, keys: dict[str, Path], capsys: pytest.CaptureFixture[str]) -> Path:
    path = tmp_path / "trust.json"
    code, out, _ = run(
        capsys, "trust", "init", "--out", path, "--root-key", keys["root"],
        "--config-key", keys["cfg"], "--config-key", keys["cfg2"], "--config-threshold", 2,
        "--now", NOW,
    )
    assert code == 0
    assert "digest sha256:" in out
    return path


@pytest.fixture
def payload(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> Path:
    code, out, _ = run(capsys, "snapshot", "example", "--now", NOW)
    assert code == 0
    path = tmp_path / "config.json"
    path.write_text(out)
    return path


def sign(capsys: pytest.CaptureFixture[str], trust: Path, payload: Path, out: Path,
         *key_paths: Path) -> tuple[int, str, str]:
    args: list[Any] = ["snapshot", "sign", "--trust", trust, payload, "--out", out, "--now", NOW]
    for k in key_paths:
        args += ["--key", k]
    return run(capsys, *args)


# ------------------------------------------------------------------ keys


def test_keys_generate_prints_key_id_and_writes_0600(tmp_path: Path, capsys) -> None:
    path = tmp_path / "a.key"
    code, out, _ = run(capsys, "keys", "generate", path)
    assert code == 0
    assert out.strip() == load_key_file(path).keyid
    assert stat.S_IMODE(path.stat().st_mode) == 0o600


def test_keys_generate_refuses_to_overwrite_without_force(tmp_path: Path, capsys) -> None:
    path = tmp_path / "a.key"
    run(capsys, "keys", "generate", path)
    before = path.read_bytes()
    code, _, err = run(capsys, "keys", "generate", path)
    assert code == 1
    assert "--force" in one_line_error(err)
    assert path.read_bytes() == before
    code, out, _ = run(capsys, "keys", "generate", "--force", path)
    assert code == 0
    assert out.strip() == load_key_file(path).keyid != json.loads(before)["keyid"]


def test_keys_generate_into_missing_directory(tmp_path: Path, capsys) -> None:
    code, _, err = run(capsys, "keys", "generate", tmp_path / "no" / "a.key")
    assert code == 1
    assert "cannot write" in one_line_error(err)


def test_keys_show_prints_public_parts_only(tmp_path: Path, capsys) -> None:
    path = tmp_path / "a.key"
    run(capsys, "keys", "generate", path)
    key = load_key_file(path)
    code, out, _ = run(capsys, "keys", "show", path)
    assert code == 0
    assert json.loads(out) == {"keyid": key.keyid, "public": key.public_key.hex}
    assert key.seed.hex() not in out
    path.write_text('{"_type": "ed25519-secret-key"')
    code, _, err = run(capsys, "keys", "show", path)
    assert code == 1
    assert str(path) in one_line_error(err)


# ------------------------------------------------------------------ trust


def test_trust_init_writes_a_verifiable_root(trust: Path, keys: dict[str, Path]) -> None:
    root = load_trusted_root(Envelope.from_bytes(trust.read_bytes()), NOW)
    ids = {name: load_key_file(p).keyid for name, p in keys.items()}
    assert root.version == 1
    assert root.expires_at == NOW + 365 * DAY
    assert root.role("root").keyids == (ids["root"],)
    assert set(root.role("config").keyids) == {ids["cfg"], ids["cfg2"]}
    assert root.role("config").threshold == 2
    # release and network default to the root keys
    assert root.role("release").keyids == root.role("network").keyids == (ids["root"],)


def test_trust_init_with_every_role(tmp_path: Path, keys: dict[str, Path], capsys) -> None:
    out = tmp_path / "t.json"
    code, _, _ = run(
        capsys, "trust", "init", "--out", out, "--root-key", keys["root"],
        "--root-key", keys["root2"], "--root-threshold", 2, "--config-key", keys["cfg"],
        "--release-key", keys["rel"], "--network-key", keys["net"], "--expires-in", 10,
        "--now", NOW,
    )
    assert code == 0
    env = Envelope.from_bytes(out.read_bytes())
    root = load_trusted_root(env, NOW)
    assert len(env.signatures) == 2
    assert root.role("root").threshold == 2
    assert root.role("release").keyids == (load_key_file(keys["rel"]).keyid,)
    assert root.role("network").keyids == (load_key_file(keys["net"]).keyid,)
    assert root.expires_at == NOW + 10 * DAY


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--root-threshold", "2"], "--root-threshold 2"),
        (["--config-threshold", "0"], "--config-threshold 0"),
        (["--expires-in", "0"], "--expires-in"),
    ],
)
def test_trust_init_refuses_bad_options(tmp_path, keys, capsys, extra, message) -> None:
    out = tmp_path / "t.json"
    code, _, err = run(
        capsys, "trust", "init", "--out", out, "--root-key", keys["root"],
        "--config-key", keys["cfg"], *extra,
    )
    assert code == 1
    assert message in one_line_error(err)
    assert not out.exists()


def test_trust_init_bad_key_files_and_existing_output(tmp_path, keys, trust, capsys) -> None:
    corrupt = tmp_path / "corrupt.key"
    corrupt.write_text("{not json")
    for bad in (tmp_path / "missing.key", corrupt, trust):
        code, _, err = run(
            capsys, "trust", "init", "--out", tmp_path / "t.json", "--root-key", bad,
            "--config-key", keys["cfg"],
        )
        assert code == 1
        assert str(bad) in one_line_error(err)
    code, _, err = run(
        capsys, "trust", "init", "--out", trust, "--root-key", keys["root"],
        "--config-key", keys["cfg"],
    )
    assert code == 1
    assert "already exists" in one_line_error(err)


def test_trust_init_requires_root_and_config_keys(tmp_path, capsys) -> None:
    with pytest.raises(SystemExit) as info:
        main(["trust", "init", "--out", str(tmp_path / "t.json")])
    assert info.value.code == 2


# ------------------------------------------------------------------ snapshot


def test_snapshot_example_is_a_valid_config(payload: Path) -> None:
    config = NodeConfig.from_payload(json.loads(payload.read_text()))
    assert config.issued_at == NOW
    assert config.expires_at == NOW + 30 * DAY
    assert len(config.models) == 1


def test_snapshot_sign_and_verify(tmp_path, keys, trust, payload, capsys) -> None:
    out = tmp_path / "snap.json"
    code, printed, _ = sign(capsys, trust, payload, out, keys["cfg"], keys["cfg2"])
    assert code == 0
    digest = node_config_hash(json.loads(payload.read_text()))
    assert printed.strip() == digest
    code, printed, _ = run(capsys, "snapshot", "verify", "--trust", trust, out, "--now", NOW)
    assert code == 0
    assert printed.strip() == f"{digest} version 1"
    code, printed, _ = run(
        capsys, "snapshot", "verify", "--trust", trust, "--hash", digest, "--applied-version", 1,
        out, "--now", NOW,
    )
    assert code == 0


def test_snapshot_sign_reports_wrong_or_too_few_keys(tmp_path, keys, trust, payload, capsys):
    out = tmp_path / "snap.json"
    code, _, err = sign(capsys, trust, payload, out, keys["other"], keys["cfg"])
    assert code == 1
    assert "ThresholdNotMet" in one_line_error(err) or "threshold" in err
    code, _, err = sign(capsys, trust, payload, out, keys["other"])
    assert code == 1
    assert "unknown" in one_line_error(err)
    assert not out.exists()


def test_snapshot_sign_refuses_invalid_payloads(tmp_path, keys, trust, payload, capsys) -> None:
    out = tmp_path / "snap.json"
    obj = json.loads(payload.read_text())
    obj["models"][0]["files"][0]["size"] = 1.5
    payload.write_text(json.dumps(obj))
    code, _, err = sign(capsys, trust, payload, out, keys["cfg"], keys["cfg2"])
    assert code == 1
    assert "models[0].files[0].size" in one_line_error(err)
    payload.write_text('{"_type": "node-config", "_type": "x"}')
    code, _, err = sign(capsys, trust, payload, out, keys["cfg"])
    assert "duplicate key" in one_line_error(err)
    code, _, err = sign(capsys, trust, tmp_path / "none.json", out, keys["cfg"])
    assert "no such file" in one_line_error(err)
    assert not out.exists()


def test_snapshot_sign_refuses_an_expired_payload(tmp_path, keys, trust, capsys) -> None:
    code, out, _ = run(capsys, "snapshot", "example", "--now", NOW - 40 * DAY)
    payload = tmp_path / "old.json"
    payload.write_text(out)
    code, _, err = sign(capsys, trust, payload, tmp_path / "s.json", keys["cfg"], keys["cfg2"])
    assert code == 1
    assert "expired" in one_line_error(err)


@pytest.fixture
def snapshot(tmp_path, keys, trust, payload, capsys) -> Path:
    out = tmp_path / "snap.json"
    assert sign(capsys, trust, payload, out, keys["cfg"], keys["cfg2"])[0] == 0
    return out


def tampered(snapshot: Path) -> Path:
    obj = json.loads(snapshot.read_text())
    obj["signed"]["participation"]["max_concurrent_jobs"] = 999
    snapshot.write_text(json.dumps(obj))
    return snapshot


@pytest.mark.parametrize(
    ("extra", "prepare", "message"),
    [
        (["--hash", "sha256:" + "0" * 64], None, "HashMismatchError"),
        (["--hash", "sha256:0"], None, "--hash"),
        (["--applied-version", "2"], None, "RollbackError"),
        (["--now", str(NOW + 30 * DAY)], None, "ExpiredError"),
        (["--now", str(NOW - 301)], None, "FutureDatedError"),
        ([], tampered, "BadSignatureError"),
        ([], lambda p: (p.write_text("{"), p)[1], "invalid JSON"),
        ([], lambda p: (p.write_text("[]"), p)[1], "not a signed envelope"),
        ([], lambda p: p.with_name("missing.json"), "no such file"),
    ],
)
def test_snapshot_verify_failures(snapshot, trust, capsys, extra, prepare, message) -> None:
    target = prepare(snapshot) if prepare else snapshot
    argv = ["snapshot", "verify", "--trust", trust, target, *extra]
    if "--now" not in extra:
        argv += ["--now", NOW]
    code, out, err = run(capsys, *argv)
    assert code == 1
    assert out == ""
    assert message in one_line_error(err)


def test_snapshot_verify_with_bad_trust_files(tmp_path, snapshot, keys, capsys) -> None:
    for bad in (tmp_path / "missing.json", keys["cfg"], snapshot):
        code, _, err = run(capsys, "snapshot", "verify", "--trust", bad, snapshot, "--now", NOW)
        assert code == 1
        assert str(bad) in one_line_error(err)


@pytest.mark.parametrize(
    "argv",
    [
        ["keys"], ["keys", "generate"], ["keys", "show"], ["trust"], ["trust", "init"],
        ["trust", "rotate"],
        ["snapshot"], ["snapshot", "example"], ["snapshot", "sign"], ["snapshot", "verify"],
    ],
)
def test_every_command_has_help(argv: list[str], capsys) -> None:
    with pytest.raises(SystemExit) as info:
        main([*argv, "--help"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: resultity")
    assert len(out) > 200


def test_subprocess_flow_and_one_line_errors(tmp_path: Path) -> None:
    def cli(*argv: Any) -> subprocess.CompletedProcess[str]:
        code = "import sys; from resultity_servers.cli import main; sys.exit(main(sys.argv[1:]))"
        return subprocess.run(
            [sys.executable, "-c", code, *map(str, argv)],
            capture_output=True, text=True, cwd=tmp_path, timeout=60, check=False,
        )

    assert cli("keys", "generate", "r.key").returncode == 0
    assert cli("trust", "init", "--out", "t.json", "--root-key", "r.key",
               "--config-key", "r.key").returncode == 0
    (tmp_path / "c.json").write_text(cli("snapshot", "example").stdout)
    signed = cli("snapshot", "sign", "--trust", "t.json", "--key", "r.key", "c.json",
                 "--out", "s.json")
    assert signed.returncode == 0, signed.stderr
    ok = cli("snapshot", "verify", "--trust", "t.json", "--hash", signed.stdout.strip(), "s.json")
    assert ok.returncode == 0
    assert ok.stdout.split() == [signed.stdout.strip(), "version", "1"]
    bad = cli("snapshot", "verify", "--trust", "nope.json", "s.json")
    assert bad.returncode == 1
    assert bad.stdout == ""
    assert bad.stderr.count("\n") == 1
    assert "Traceback" not in bad.stderr


def test_trust_rotate(tmp_path, keys, trust, capsys) -> None:
    out = tmp_path / "v2.json"
    code, printed, _ = run(
        capsys, "trust", "rotate", "--current", trust, "--out", out, "--old-key", keys["root"],
        "--root-key", keys["root2"], "--config-key", keys["other"], "--now", NOW,
    )
    assert code == 0
    assert "v2" in printed
    v1 = TrustRoot.from_payload(Envelope.from_bytes(trust.read_bytes()).signed)
    v2 = rotate_root(v1, Envelope.from_bytes(out.read_bytes()), NOW)
    assert v2.role("root").keyids == (load_key_file(keys["root2"]).keyid,)
    assert v2.role("config").keyids == (load_key_file(keys["other"]).keyid,)
    assert v2.role("config").threshold == 1
    assert v2.role("release") == v1.role("release")  # not given: kept


def test_trust_rotate_refusals(tmp_path, keys, trust, capsys) -> None:
    out = tmp_path / "v2.json"
    # the new root keys alone cannot rotate: the current root keys must sign too
    code, _, err = run(
        capsys, "trust", "rotate", "--current", trust, "--out", out,
        "--old-key", keys["root2"], "--root-key", keys["root2"], "--now", NOW,
    )
    assert code == 1
    assert "root keys of v1" in one_line_error(err)
    assert not out.exists()
    code, _, err = run(
        capsys, "trust", "rotate", "--current", tmp_path / "none.json", "--out", out,
        "--old-key", keys["root"],
    )
    assert code == 1
    assert "no such file" in one_line_error(err)


def test_trust_rotate_from_an_expired_root(tmp_path, keys, trust, capsys) -> None:
    out = tmp_path / "v2.json"
    later = NOW + 400 * DAY
    code, _, err = run(
        capsys, "trust", "rotate", "--current", trust, "--out", out, "--old-key", keys["root"],
        "--now", later,
    )
    assert code == 0, err
    assert load_trusted_root(Envelope.from_bytes(out.read_bytes()), later).version == 2

"""`saestream keygen`: key files in zmq.auth's format, secret kept private."""

from __future__ import annotations

import stat
from pathlib import Path

import zmq.auth
from conftest import run_cli


def test_keygen_writes_a_usable_key_pair(tmp_path: Path) -> None:
    result = run_cli(["keygen", str(tmp_path / "keys"), "--name", "producer-1"], timeout=60)
    assert result.returncode == 0, result.stderr
    public_file = tmp_path / "keys" / "producer-1.key"
    secret_file = tmp_path / "keys" / "producer-1.key_secret"
    public, none = zmq.auth.load_certificate(public_file)
    public2, secret = zmq.auth.load_certificate(secret_file)
    assert none is None and public == public2 and len(secret) == 40
    assert stat.S_IMODE(secret_file.stat().st_mode) == 0o600


def test_keygen_refuses_to_overwrite_without_force(tmp_path: Path) -> None:
    assert run_cli(["keygen", str(tmp_path)], timeout=60).returncode == 0
    before = (tmp_path / "saestream.key").read_text()
    again = run_cli(["keygen", str(tmp_path)], timeout=60)
    assert again.returncode == 2
    assert again.stderr.startswith("saestream: error:") and len(again.stderr.splitlines()) == 1
    assert (tmp_path / "saestream.key").read_text() == before
    forced = run_cli(["keygen", str(tmp_path), "--force"], timeout=60)
    assert forced.returncode == 0
    assert (tmp_path / "saestream.key").read_text() != before

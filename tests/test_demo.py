"""`saestream demo` end to end, on the tiny random model so it runs in seconds."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from conftest import run_cli


@pytest.mark.slow
def test_demo_runs_two_producers_and_a_consumer_and_leaves_a_checkpoint(tmp_path: Path) -> None:
    work = tmp_path / "demo"
    result = run_cli(
        [
            "demo", "--model", "tiny", "--corpus", "synthetic", "--duration", "6",
            "--sae", "name=demo,latents=256,k=8,k_aux=64", "--batch-size", "256",
            "--buffer-tokens", "4096", "--workdir", str(work), "--port", "0",
            "--metrics-port", "0",
        ],
        timeout=240,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    out = result.stdout
    assert "metrics: consumer http://127.0.0.1:" in out
    assert "stopped (6 s elapsed); consumer exit code 0" in out
    line = next(x for x in out.splitlines() if x.startswith("checkpoint: "))
    snapshot = Path(line.split(": ", 1)[1])
    assert (snapshot / "demo" / "sae.safetensors").is_file()
    consumer_log = (work / "logs" / "consumer.log").read_text()
    assert "new producer demo-1" in consumer_log
    assert "new producer demo-2" in consumer_log
    assert "final snapshot" in consumer_log
    # It ends by measuring the final snapshot's downstream loss on held-out contexts.
    assert re.search(r"^downstream on 8 held-out contexts: CE clean [0-9.]+, spliced [0-9.]+, "
                     r"delta CE [-+][0-9.]+, loss recovered ", out, re.M), out
    evaluated = json.loads((work / "eval.json").read_text())
    assert evaluated["step"] == int(snapshot.name.removeprefix("step-"))
    assert evaluated["split"] == "eval" and evaluated["contexts"] == 8
    # ... and prints the feature browser it built from that snapshot.
    entry = (work / "features" / "index.html").resolve()
    assert f"feature browser: {entry.as_uri()}" in out.splitlines()
    latest = (work / "features" / "latest").read_text().strip()
    assert latest.endswith(snapshot.name)
    assert (entry.parent / latest / "demo" / "index.js").is_file()


def test_demo_needs_a_hook_for_an_unknown_model(tmp_path: Path) -> None:
    result = run_cli(["demo", "--model", "gpt2", "--workdir", str(tmp_path)], timeout=60)
    assert result.returncode == 2
    assert "give --hook" in result.stderr

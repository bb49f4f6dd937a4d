"""The monitoring stack against the real thing.

Debian's Prometheus, started here on 127.0.0.1 with deploy/prometheus/prometheus.yml (its
jobs, relabelling, file-based discovery and rule files; only the targets and a 1 s scrape
and evaluation interval changed), scrapes a short real producer → consumer run (tiny model,
tiny SAE) and the evaluator that scores the consumer's snapshots. Every query of the Grafana
dashboard and every recording rule must return data through Prometheus' HTTP API, every
rule must evaluate without error, and `promtool check metrics` must find nothing to report
in any daemon's /metrics.

And the systemd units' command lines, expanded as systemd expands them from the shipped
environment file, start a real consumer, producer instance and evaluator; ExecReload
snapshots, the evaluator scores that snapshot, KillSignal stops each with exit 0 (the
consumer after a final snapshot), and a restart resumes.
"""

from __future__ import annotations

import json
import re
import signal
import subprocess
import time
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import yaml
import zmq
from conftest import free_tcp_port, saestream_cmd
from test_deploy import (
    PROM,
    RULE_FILES,
    SYSTEMD,
    UNIT_PREFIX,
    dashboard,
    dashboard_exprs,
    recording_rules,
    substitute,
    tool,
    unit_settings,
)

pytestmark = pytest.mark.slow

HOOK = "model.layers.2"
SAE = "tiny"
PRODUCER_ID = "live-producer"
DEADLINE = 75.0  # seconds for everything to show up; typically ~15 s


def http_get(url: str, timeout: float = 5.0) -> bytes:
    with urllib.request.urlopen(url, timeout=timeout) as resp:
        return resp.read()


def wait_for(
    what: str, check: Callable[[], object], timeout: float, procs=(),
    explain: Callable[[], str] = lambda: "",
) -> object:
    """Poll `check` until it returns something truthy; fail if a process died meanwhile."""
    end = time.monotonic() + timeout
    last_err: Exception | None = None
    while time.monotonic() < end:
        for name, proc, log in procs:
            if proc.poll() is not None:
                pytest.fail(f"{name} exited with {proc.returncode} while waiting for {what}:\n"
                            + log.read_text()[-3000:])
        try:
            result = check()
            if result:
                return result
        except (OSError, ValueError, KeyError) as exc:
            last_err = exc
        time.sleep(0.5)
    pytest.fail(f"timed out waiting for {what} (last error: {last_err}){explain()}")


def metric_value(body: str, name: str) -> float:
    """Sum of the samples of `name` (any labels) in a /metrics body."""
    total, found = 0.0, False
    for line in body.splitlines():
        m = re.match(rf"{re.escape(name)}(?:\{{[^}}]*\}})? (\S+)$", line)
        if m:
            total += float(m.group(1))
            found = True
    if not found:
        raise KeyError(name)
    return total


class Prometheus:
    def __init__(self, base: str) -> None:
        self.base = base

    def api(self, path: str, **params: str) -> dict:
        url = f"{self.base}/api/v1/{path}"
        if params:
            url += "?" + urllib.parse.urlencode(params)
        reply = json.loads(http_get(url))
        assert reply["status"] == "success", reply
        return reply["data"]

    def query(self, expr: str) -> list[dict]:
        data = self.api("query", query=expr)
        assert data["resultType"] == "vector", (expr, data)
        return data["result"]


def live_prometheus_config(tmp_path: Path, consumer: str, producer: str, evaluator: str) -> Path:
    """deploy/prometheus/prometheus.yml as shipped, but for this machine: 1 s intervals, the
    consumer and the evaluator as their static targets, the producer found through
    file-based discovery (the compose DNS discovery dropped), and the rule files by absolute
    path."""
    cfg = yaml.safe_load((PROM / "prometheus.yml").read_text())
    cfg["global"].update(scrape_interval="1s", evaluation_interval="1s")
    cfg["rule_files"] = [str(PROM / f) for f in cfg["rule_files"]]
    targets = tmp_path / "targets"
    targets.mkdir()
    (targets / "producers-live.yml").write_text(yaml.safe_dump([{"targets": [producer]}]))
    jobs = {j["job_name"]: j for j in cfg["scrape_configs"]}
    jobs["saestream-consumer"]["static_configs"][0]["targets"] = [consumer]
    jobs["saestream-evaluator"]["static_configs"][0]["targets"] = [evaluator]
    del jobs["saestream-producer"]["dns_sd_configs"]
    for sd in jobs["saestream-producer"]["file_sd_configs"]:
        sd["files"] = [str(targets / f.removeprefix("targets/")) for f in sd["files"]]
        sd["refresh_interval"] = "1s"
    cfg["scrape_configs"] = [
        jobs["saestream-consumer"], jobs["saestream-producer"], jobs["saestream-evaluator"]]
    path = tmp_path / "prometheus.yml"
    path.write_text(yaml.safe_dump(cfg))
    return path


@pytest.fixture
def processes(tmp_path: Path) -> Iterator[Callable[..., subprocess.Popen]]:
    """Start processes with logs in tmp_path; SIGTERM (then SIGKILL) each at the end."""
    started: list[subprocess.Popen] = []

    def start(name: str, argv: list[str]) -> subprocess.Popen:
        log_path = tmp_path / f"{name}.log"
        with log_path.open("wb") as log:
            proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, cwd=tmp_path)
        proc.log_path = log_path  # type: ignore[attr-defined]
        started.append(proc)
        return proc

    yield start
    for proc in reversed(started):  # the last started first: producers flush while the
        if proc.poll() is None:     # consumer is still there
            proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def test_prometheus_gets_data_for_every_dashboard_query_and_recording_rule(
    tmp_path: Path, processes
) -> None:
    prometheus_bin, promtool = tool("prometheus"), tool("promtool")
    zmq_port, c_port, p_port, e_port, web_port = (free_tcp_port() for _ in range(5))

    consumer = processes("consumer", saestream_cmd(
        "consumer", "--bind", f"tcp://127.0.0.1:{zmq_port}", "--hook", HOOK,
        "--sae", f"name={SAE},latents=128,k=8", "--buffer-tokens", "1024",
        "--batch-size", "128", "--checkpoint-dir", str(tmp_path / "ck"),
        "--metrics-port", str(c_port), "--device", "cpu", "--log-every", "5",
        "--record", str(tmp_path / "rec"), "--record-shard-tokens", "256",  # the Recording row
    ))
    producer = processes("producer", saestream_cmd(
        "producer", "--model", "tiny", "--hook", HOOK, "--corpus", "synthetic",
        "--connect", f"tcp://127.0.0.1:{zmq_port}", "--producer-id", PRODUCER_ID,
        "--chunk-tokens", "128", "--batch-size", "4", "--seq-len", "64",
        "--metrics-port", str(p_port), "--device", "cpu",
    ))
    # the evaluator as deploy/ runs it (model and corpus of the producer, the consumer's
    # checkpoint directory, a history file elsewhere), on a few short contexts
    (tmp_path / "evaluator").mkdir()
    evaluator = processes("evaluator", saestream_cmd(
        "evaluator", "--checkpoint-dir", str(tmp_path / "ck"), "--model", "tiny",
        "--corpus", "synthetic", "--seq-len", "16", "--contexts", "6", "--device", "cpu",
        "--poll-seconds", "0.2", "--history", str(tmp_path / "evaluator" / "history.jsonl"),
        "--metrics-port", str(e_port),
    ))

    config_path = live_prometheus_config(tmp_path, f"127.0.0.1:{c_port}", f"127.0.0.1:{p_port}",
                                         f"127.0.0.1:{e_port}")
    check = subprocess.run([promtool, "check", "config", str(config_path)],
                           capture_output=True, text=True, timeout=60)
    assert check.returncode == 0, check.stdout + check.stderr
    prom_proc = processes("prometheus", [
        prometheus_bin, f"--config.file={config_path}",
        f"--storage.tsdb.path={tmp_path / 'tsdb'}",
        f"--web.listen-address=127.0.0.1:{web_port}",
        "--storage.tsdb.retention.time=1h", "--log.level=warn",
    ])
    procs = [(n, p, p.log_path) for n, p in
             (("consumer", consumer), ("producer", producer), ("evaluator", evaluator),
              ("prometheus", prom_proc))]
    prom = Prometheus(f"http://127.0.0.1:{web_port}")
    wait_for("prometheus ready", lambda: http_get(f"{prom.base}/-/ready"), 30, procs)

    consumer_url = f"http://127.0.0.1:{c_port}/metrics"
    producer_url = f"http://127.0.0.1:{p_port}/metrics"
    evaluator_url = f"http://127.0.0.1:{e_port}/metrics"
    wait_for("training steps",
             lambda: metric_value(http_get(consumer_url).decode(),
                                  "saestream_train_steps_total") > 0, DEADLINE, procs)

    # a snapshot on SIGUSR1 (for the checkpoint panel and the evaluator's Downstream row),
    # and one bad message (for rejects)
    consumer.send_signal(signal.SIGUSR1)
    wait_for("a checkpoint",
             lambda: metric_value(http_get(consumer_url).decode(),
                                  "saestream_checkpoints_total") >= 1, DEADLINE, procs)
    wait_for("the evaluated snapshot",
             lambda: metric_value(http_get(evaluator_url).decode(),
                                  "saestream_eval_snapshot_step") >= 1, DEADLINE, procs)
    ctx = zmq.Context()
    try:
        push = ctx.socket(zmq.PUSH)
        push.setsockopt(zmq.LINGER, 2000)
        push.connect(f"tcp://127.0.0.1:{zmq_port}")
        push.send_multipart([b"not a header", b"not a payload"])
        push.close()
    finally:
        ctx.term()
    wait_for("a counted reject",
             lambda: metric_value(http_get(consumer_url).decode(),
                                  "saestream_rejected_messages_total") >= 1, DEADLINE, procs)

    # every exposition body passes promtool's linter
    for url in (consumer_url, producer_url, evaluator_url):
        body = http_get(url)
        assert b"saestream_" in body
        lint = subprocess.run([promtool, "check", "metrics"], input=body,
                              capture_output=True, timeout=60)
        assert lint.returncode == 0 and not (lint.stdout + lint.stderr).strip(), (
            url, lint.stdout.decode() + lint.stderr.decode())

    # the queries: every dashboard expression (variables as `.*` and as real label values),
    # every template variable's series, every recording rule's output series
    d = dashboard()
    real = {"hook": HOOK, "sae": SAE, "producer": PRODUCER_ID}
    queries: dict[str, str] = {}
    for title, expr in dashboard_exprs(d):
        queries[f"panel {title!r}: {expr}"] = substitute(expr)
        queries[f"panel {title!r} (hook/sae/producer selected): {expr}"] = substitute(expr, real)
    for v in d["templating"]["list"]:
        if v["type"] == "query":
            series = re.fullmatch(r"label_values\((.*), (\w+)\)", v["definition"]).group(1)
            queries[f"variable {v['name']}"] = substitute(series, real)
    for rule in recording_rules():
        queries[f"recording rule {rule['record']}"] = rule["record"]

    def empty_queries() -> list[str]:
        return [k for k, q in queries.items() if not prom.query(q)]

    missing: list[str] = []

    def all_have_data() -> bool:
        missing[:] = empty_queries()
        return not missing

    wait_for("data for every query", all_have_data, DEADLINE, procs,
             explain=lambda: "; no data for:\n  " + "\n  ".join(missing))

    # the variables offer the real label values
    for name, value in real.items():
        assert value in prom.api(f"label/{name}/values"), name

    # every target up, and every recording and alerting rule evaluates without error
    targets = prom.api("targets")["activeTargets"]
    assert {t["labels"]["job"]: t["health"] for t in targets} == {
        "saestream-consumer": "up", "saestream-producer": "up", "saestream-evaluator": "up"}
    assert {t["labels"]["job"]: t["labels"]["role"] for t in targets} == {
        "saestream-consumer": "consumer", "saestream-producer": "producer",
        "saestream-evaluator": "evaluator"}
    rules = [r for g in prom.api("rules")["groups"] for r in g["rules"]]
    assert len(rules) == sum(
        len(g["rules"]) for f in RULE_FILES for g in yaml.safe_load(f.read_text())["groups"]
    )
    bad = [(r["name"], r.get("lastError")) for r in rules if r["health"] != "ok"]
    assert not bad, bad

    # a fresh tiny run is healthy: none of the data alerts fire
    firing = {a["labels"]["alertname"] for a in prom.api("alerts")["alerts"]
              if a["state"] == "firing"}
    assert firing <= {"SaestreamMessagesRejected"}, firing

    # the evaluator only read the checkpoint directory, and wrote its history elsewhere
    history = (tmp_path / "evaluator" / "history.jsonl").read_text().splitlines()
    assert history and json.loads(history[0])["saes"][SAE]["hook"] == HOOK
    assert not [p for p in (tmp_path / "ck").rglob("*") if "history" in p.name]


# ---------------------------------------------------------------- systemd command lines


def systemd_env_file(path: Path) -> dict[str, str]:
    """KEY=value lines of a systemd EnvironmentFile (comments, blank lines skipped)."""
    env = {}
    for line in path.read_text().splitlines():
        line = line.strip()
        if line and not line.startswith(("#", ";")):
            key, _, value = line.partition("=")
            env[key.strip()] = value.strip().strip('"')
    return env


def systemd_command(
    unit: Path, key: str, instance: str, root: Path, extra_env: dict[str, str] | None = None
) -> list[str]:
    """`key` (ExecStart, ExecReload) of `unit` expanded as systemd does it: specifiers,
    Environment= then the EnvironmentFile=s in order (files under `root`), `${VAR}` as one
    word, `$VAR` split on whitespace; /var/lib/saestream moved under `root`."""
    settings = unit_settings(unit)
    specifiers = {"%i": instance, "%H": "testhost", "%%": "%"}

    def spec(text: str) -> str:
        return re.sub(r"%[iH%]", lambda m: specifiers[m.group(0)], text)

    env: dict[str, str] = {}
    for item in settings.get("Environment", []):
        name, _, value = spec(item).partition("=")
        env[name] = value
    for item in settings.get("EnvironmentFile", []):
        optional = item.startswith("-")
        path = root / spec(item.lstrip("-")).lstrip("/")
        if path.exists():
            env.update(systemd_env_file(path))
        else:
            assert optional, f"{unit.name}: {path} missing"
    env.update(extra_env or {})
    words: list[str] = []
    for word in spec(settings[key][0]).split():
        split = re.fullmatch(r"\$([A-Za-z_]\w*)", word)
        if split:
            words += env.get(split.group(1), "").split()
        else:
            words.append(re.sub(r"\$\{(\w+)\}", lambda m: env[m.group(1)], word))
    state = str(root / "var" / "lib" / "saestream")
    return [w.replace("/var/lib/saestream", state) for w in words]


def test_systemd_units_command_lines_start_stop_reload_and_resume_for_real(
    tmp_path: Path, processes
) -> None:
    """The units' ExecStart lines, expanded from the shipped env file (with test-sized
    overrides) and a per-instance producer file, run a real consumer, producer@0 and
    evaluator; ExecReload snapshots and the evaluator scores that snapshot; SIGTERM
    (KillSignal) stops the evaluator with exit 0, and the consumer after a final snapshot."""
    zmq_port, c_port, p_port, e_port = (free_tcp_port() for _ in range(4))
    etc = tmp_path / "etc" / "saestream"
    etc.mkdir(parents=True)
    (tmp_path / "var" / "lib" / "saestream").mkdir(parents=True)
    evaluator_unit = SYSTEMD / "saestream-evaluator.service"
    for state in unit_settings(evaluator_unit)["StateDirectory"]:  # systemd creates it
        (tmp_path / "var" / "lib" / state).mkdir(parents=True)
    overrides = {
        "SAESTREAM_HOOK": HOOK, "SAESTREAM_METRICS_ADDR": "127.0.0.1",
        "SAESTREAM_BIND": f"tcp://127.0.0.1:{zmq_port}", "SAESTREAM_SAE": "name=u,latents=64,k=4",
        "SAESTREAM_BUFFER_TOKENS": "1024", "SAESTREAM_BATCH_SIZE": "128",
        "SAESTREAM_CONSUMER_DEVICE": "cpu", "SAESTREAM_CONSUMER_METRICS_PORT": str(c_port),
        "SAESTREAM_CONSUMER_ARGS": "--log-every 5 --min-fill 0.25",
        "SAESTREAM_MODEL": "tiny", "SAESTREAM_CORPUS": "synthetic",
        "SAESTREAM_CONNECT": f"tcp://127.0.0.1:{zmq_port}", "SAESTREAM_SHARDS": "2",
        "SAESTREAM_PRODUCER_ARGS": "--max-tokens 3072 --seq-len 64 --chunk-tokens 128",
        "SAESTREAM_EVALUATOR_DEVICE": "cpu", "SAESTREAM_EVALUATOR_METRICS_PORT": str(e_port),
        "SAESTREAM_EVALUATOR_ARGS": "--seq-len 16 --contexts 6 --poll-seconds 0.2",
    }
    shipped = (SYSTEMD / "saestream.env").read_text()
    (etc / "saestream.env").write_text(
        shipped + "".join(f"{k}={v}\n" for k, v in overrides.items())
    )
    # the per-instance file of instance 0 (optional in the unit) overrides device and port
    (etc / "producer-0.env").write_text(
        f"SAESTREAM_PRODUCER_DEVICE=cpu\nSAESTREAM_PRODUCER_METRICS_PORT={p_port}\n"
    )
    consumer_unit = SYSTEMD / "saestream-consumer.service"
    producer_unit = SYSTEMD / "saestream-producer@.service"
    c_argv = systemd_command(consumer_unit, "ExecStart", "", tmp_path)
    p_argv = systemd_command(producer_unit, "ExecStart", "0", tmp_path)
    e_argv = systemd_command(evaluator_unit, "ExecStart", "", tmp_path)
    assert c_argv[0] == p_argv[0] == e_argv[0] == f"{UNIT_PREFIX}/bin/saestream"
    assert "--shard" in p_argv and p_argv[p_argv.index("--shard") + 1] == "0/2"
    assert p_argv[p_argv.index("--metrics-port") + 1] == str(p_port)

    consumer = processes("consumer", saestream_cmd(*c_argv[1:]))
    producer = processes("producer", saestream_cmd(*p_argv[1:]))
    evaluator = processes("evaluator", saestream_cmd(*e_argv[1:]))
    procs = [("consumer", consumer, consumer.log_path),
             ("evaluator", evaluator, evaluator.log_path)]
    consumer_url = f"http://127.0.0.1:{c_port}/metrics"
    assert producer.wait(timeout=120) == 0, producer.log_path.read_text()[-3000:]
    state_file = tmp_path / "var" / "lib" / "saestream" / "producer-0.state"
    assert state_file.exists()
    wait_for("training steps", lambda: metric_value(
        http_get(consumer_url).decode(), "saestream_train_steps_total") > 0, DEADLINE, procs)

    # systemctl reload: ExecReload with $MAINPID
    reload_argv = systemd_command(
        consumer_unit, "ExecReload", "", tmp_path, {"MAINPID": str(consumer.pid)}
    )
    subprocess.run(reload_argv, check=True, timeout=30)
    wait_for("the reload snapshot", lambda: metric_value(
        http_get(consumer_url).decode(), "saestream_checkpoints_total") >= 1, DEADLINE, procs)

    # the evaluator scores it, appends its history line, and stops on its KillSignal
    evaluator_url = f"http://127.0.0.1:{e_port}/metrics"
    wait_for("the evaluated reload snapshot", lambda: metric_value(
        http_get(evaluator_url).decode(), "saestream_eval_snapshot_step") >= 1, DEADLINE, procs)
    evaluator.send_signal(getattr(signal, unit_settings(evaluator_unit)["KillSignal"][0]))
    assert evaluator.wait(timeout=30) == 0, evaluator.log_path.read_text()[-3000:]
    history_path = e_argv[e_argv.index("--history") + 1]
    assert history_path.startswith(str(tmp_path / "var" / "lib" / "saestream-evaluator"))
    record = json.loads(Path(history_path).read_text().splitlines()[0])
    assert record["model"] == "tiny" and "u" in record["saes"]
    procs = procs[:1]

    # systemctl stop: KillSignal, then the daemon has TimeoutStopSec to finish
    steps_before_stop = metric_value(http_get(consumer_url).decode(), "saestream_train_steps_total")
    signal_name = unit_settings(consumer_unit)["KillSignal"][0]
    consumer.send_signal(getattr(signal, signal_name))
    assert consumer.wait(timeout=60) == 0, consumer.log_path.read_text()[-3000:]
    checkpoints = tmp_path / "var" / "lib" / "saestream" / "checkpoints"
    assert (checkpoints / "latest").exists()
    assert list(checkpoints.glob("step-*/u/sae.safetensors"))

    # systemctl start again: --resume continues from the snapshot
    consumer2 = processes("consumer2", saestream_cmd(*c_argv[1:]))
    resumed = wait_for("the resumed consumer's step count", lambda: metric_value(
        http_get(consumer_url).decode(), "saestream_train_steps_total"), DEADLINE,
        [("consumer2", consumer2, consumer2.log_path)])
    assert resumed >= steps_before_stop

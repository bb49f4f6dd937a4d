"""deploy/: every file checked by the real tool it is written for.

promtool (check config, check rules, test rules) for Prometheus; docker-compose (Debian's
compose implementation, `config`, no engine needed) and the compose-spec JSON schema for the
compose files; hadolint for the Dockerfile; systemd-analyze verify for the units;
kubernetes-validate (the Kubernetes OpenAPI schemas, offline) for the manifests; and the
daemons' own click commands for every flag those files pass. `make test` installs the
tools (`make deploy-tools`). The live test that runs Prometheus against real daemons is in
test_deploy_live.py.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
PROM = DEPLOY / "prometheus"
RULE_FILES = sorted((PROM / "rules").glob("*.yml"))
DASHBOARD = DEPLOY / "grafana" / "dashboards" / "saestream.json"
COMPOSE = DEPLOY / "docker-compose.yml"
COMPOSE_GPU = DEPLOY / "docker-compose.gpu.yml"
COMPOSE_DP = DEPLOY / "docker-compose.dp.yml"
SYSTEMD = DEPLOY / "systemd"
K8S = DEPLOY / "k8s"
K8S_DP = DEPLOY / "k8s-data-parallel"
UNIT_PREFIX = "/opt/saestream/.venv"

# Grafana variables -> what the live test and promtool substitute for them.
GRAFANA_SUBSTITUTIONS = {
    "$__rate_interval": "5s",
    "$__interval": "1s",
    "$__range": "1m",
}


# ---------------------------------------------------------------- tool lookup


def tool(name: str) -> str:
    """Path of an external validator: the venv's bin first, then PATH.

    Missing tools fail the test under CI (where `make test` installs them) and skip it
    elsewhere, with the command that installs them.
    """
    local = Path(sys.executable).parent / name
    if local.exists():
        return str(local)
    found = shutil.which(name)
    if found:
        return found
    msg = f"{name} not installed: run `make deploy-tools`"
    if os.environ.get("CI"):
        pytest.fail(msg)
    pytest.skip(msg)


def run(argv: list[str], **kw) -> subprocess.CompletedProcess:
    return subprocess.run(argv, capture_output=True, text=True, timeout=120, **kw)


def load_yaml_docs(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]


# ---------------------------------------------------------------- metric names


def exported_metric_names() -> set[str]:
    """Every metric family name the consumer, the producer and the evaluator export (from
    their code)."""
    from prometheus_client import CollectorRegistry

    from saestream.consumer.metrics import ConsumerMetrics
    from saestream.evaluator.metrics import EvaluatorMetrics
    from saestream.producer.metrics import ProducerMetrics

    names: set[str] = set()
    for registry in (ConsumerMetrics().registry, _producer_registry(ProducerMetrics),
                     EvaluatorMetrics().registry):
        assert isinstance(registry, CollectorRegistry)
        for family in registry.collect():
            names.add(family.name)
            names.update(s.name for s in family.samples)
            if family.type == "counter":
                names.add(family.name + "_total")
            if family.type == "histogram":
                names.update(family.name + s for s in ("_bucket", "_sum", "_count"))
    return names


def _producer_registry(producer_metrics_cls):
    from prometheus_client import CollectorRegistry

    registry = CollectorRegistry()
    producer_metrics_cls.create(registry)
    return registry


PROMQL_FUNCTIONS = {
    "sum", "rate", "increase", "histogram_quantile", "time", "max", "min", "avg", "by",
    "on", "and", "or", "unless", "without", "offset", "min_over_time", "max_over_time",
    "avg_over_time", "le", "clamp_min", "ignoring", "group_left", "bool", "count",
}


def metric_names_in(expr: str) -> set[str]:
    """Identifiers in a PromQL expression that name saestream metrics or recording rules."""
    no_strings = re.sub(r'"[^"]*"', '""', expr)
    no_labels = re.sub(r"\{[^}]*\}", "", no_strings)
    no_groupings = re.sub(r"\b(by|on|without|ignoring)\s*\([^)]*\)", "", no_labels)
    idents = set(re.findall(r"[A-Za-z_:][A-Za-z0-9_:]*", no_groupings))
    return {i for i in idents if i.startswith("saestream")}


# ---------------------------------------------------------------- dashboard helpers


def dashboard() -> dict:
    return json.loads(DASHBOARD.read_text())


def dashboard_panels(d: dict) -> Iterator[dict]:
    for p in d["panels"]:
        yield p
        yield from p.get("panels", [])


def dashboard_exprs(d: dict) -> list[tuple[str, str]]:
    """(panel title, expr) for every query of the dashboard."""
    return [
        (p["title"], t["expr"])
        for p in dashboard_panels(d)
        for t in p.get("targets", [])
    ]


def substitute(expr: str, values: dict[str, str] | None = None) -> str:
    """Grafana's variables replaced: template variables by `values` (default `.*`)."""
    for var, value in GRAFANA_SUBSTITUTIONS.items():
        expr = expr.replace(var, value)
    return re.sub(
        r"\$\{?([A-Za-z_]\w*)\}?", lambda m: (values or {}).get(m.group(1), ".*"), expr
    )


def rule_groups() -> list[dict]:
    return [g for f in RULE_FILES for g in yaml.safe_load(f.read_text())["groups"]]


def recording_rules() -> list[dict]:
    return [r for g in rule_groups() for r in g["rules"] if "record" in r]


def alerting_rules() -> list[dict]:
    return [r for g in rule_groups() for r in g["rules"] if "alert" in r]


# ================================================================ Prometheus


def test_prometheus_config_passes_promtool_with_file_sd_targets(tmp_path: Path) -> None:
    work = tmp_path / "prometheus"
    shutil.copytree(PROM, work)
    # the examples become live file_sd files, so promtool checks them too
    shutil.copy(work / "targets" / "producers.example.yml", work / "targets" / "producers-a.yml")
    shutil.copy(work / "targets" / "consumers.example.yml", work / "targets" / "consumers-a.yml")
    (work / "targets" / "producers-b.json").write_text(
        json.dumps([{"targets": ["10.1.2.3:9110"], "labels": {"site": "b"}}])
    )
    (work / "targets" / "consumers-b.json").write_text(
        json.dumps([{"targets": ["10.1.2.3:9121"], "labels": {"training_copy": "true"}}])
    )
    res = run([tool("promtool"), "check", "config", "prometheus.yml"], cwd=work)
    out = res.stdout + res.stderr
    assert res.returncode == 0, out
    assert "WARNING" not in out, out
    assert f"SUCCESS: {len(RULE_FILES)} rule files found" in out, out


def test_prometheus_config_scrapes_consumer_evaluator_and_any_number_of_producers() -> None:
    cfg = yaml.safe_load((PROM / "prometheus.yml").read_text())
    jobs = {j["job_name"]: j for j in cfg["scrape_configs"]}
    consumer, producer = jobs["saestream-consumer"], jobs["saestream-producer"]
    assert consumer["static_configs"][0]["targets"] == ["consumer:9101"]
    evaluator = jobs["saestream-evaluator"]["static_configs"][0]
    assert evaluator["targets"] == ["evaluator:9103"]  # the compose service
    assert evaluator["labels"] == {"role": "evaluator"}
    assert producer["dns_sd_configs"][0]["names"] == ["producer"]  # compose --scale
    assert producer["dns_sd_configs"][0]["port"] == 9102
    assert producer["file_sd_configs"][0]["files"]  # hosts listed in files, no restart
    assert cfg["rule_files"] == ["rules/*.yml"]
    example = yaml.safe_load((PROM / "targets" / "producers.example.yml").read_text())
    assert example[0]["targets"]


def test_rule_files_pass_promtool_check() -> None:
    assert len(RULE_FILES) == 2
    res = run([tool("promtool"), "check", "rules", *map(str, RULE_FILES)])
    assert res.returncode == 0, res.stdout + res.stderr
    assert res.stdout.count("SUCCESS") == len(RULE_FILES)


def test_rule_unit_tests_pass_promtool_test_rules() -> None:
    res = run(
        [tool("promtool"), "test", "rules", "saestream-rules.test.yml"], cwd=PROM / "tests"
    )
    assert res.returncode == 0, res.stdout + res.stderr
    assert "SUCCESS" in res.stdout


def test_every_alert_is_unit_tested_firing_and_silent() -> None:
    tests = yaml.safe_load((PROM / "tests" / "saestream-rules.test.yml").read_text())["tests"]
    firing: set[str] = set()
    silent: set[str] = set()
    for t in tests:
        for case in t.get("alert_rule_test", []):
            (firing if case["exp_alerts"] else silent).add(case["alertname"])
    names = {r["alert"] for r in alerting_rules()}
    assert names - firing == set(), "alerts without a test where they fire"
    assert names - silent == set(), "alerts without a test where they stay silent"


def test_recording_rules_cover_ingest_training_bytes_and_reject_rates() -> None:
    by_name = {r["record"]: r["expr"] for r in recording_rules()}
    wanted = {
        "saestream:received_tokens:rate1m": "saestream_received_tokens_total",
        "saestream:trained_tokens:rate1m": "saestream_trained_tokens_total",
        "saestream:received_wire_bytes:rate1m": "saestream_received_wire_bytes_total",
        "saestream:producer_wire_bytes:rate1m": "saestream_producer_wire_bytes_total",
        "saestream:rejected_messages:rate5m": "saestream_rejected_messages_total",
    }
    for name, metric in wanted.items():
        assert metric in by_name[name]
    for r in recording_rules():
        assert re.fullmatch(r"[a-z_]+:[a-z0-9_]+:[a-z0-9_]+", r["record"]), r["record"]


def test_alerts_cover_each_required_condition() -> None:
    exprs = {r["alert"]: r["expr"] for r in alerting_rules()}
    required = {
        "saestream_dead_latent_fraction": "dead latents above a threshold",
        "saestream_normalized_mse": "normalized MSE not improving",
        "saestream_producer_last_seen_timestamp_seconds": "a producer silent",
        "saestream_rejected_messages_total": "rejected messages",
        "saestream:buffer_fill:ratio": "buffer starved",
        "saestream_last_checkpoint_timestamp_seconds": "no checkpoint for too long",
        "saestream_eval_loss_recovered": "loss recovered falling",
    }
    for metric, what in required.items():
        assert any(metric in e for e in exprs.values()), what
    for r in alerting_rules():
        assert r["labels"]["severity"] in {"critical", "warning", "info"}
        assert r["annotations"]["summary"]


def test_loss_recovered_alert_needs_a_fall_that_lasts_30_minutes() -> None:
    """Two adjacent 30-minute windows (so one bad snapshot that the next repairs cannot fire
    it; promtool's unit tests show both cases), and the annotation says what it means."""
    (rule,) = [r for r in alerting_rules() if r["alert"] == "SaestreamLossRecoveredFalling"]
    expr = " ".join(rule["expr"].split())
    assert "max_over_time(saestream_eval_loss_recovered[30m])" in expr
    assert "max_over_time(saestream_eval_loss_recovered[30m] offset 30m)" in expr
    assert rule["labels"]["severity"] == "warning"
    assert "30 minutes" in rule["annotations"]["summary"]
    assert "30 minutes" in rule["annotations"]["description"]


def test_rules_use_only_metrics_the_daemons_export() -> None:
    known = exported_metric_names() | {r["record"] for r in recording_rules()}
    for r in recording_rules() + alerting_rules():
        unknown = metric_names_in(r["expr"]) - known
        assert not unknown, (r.get("record") or r.get("alert"), unknown)


# ================================================================ Grafana


REQUIRED_PANELS = {
    "Normalized MSE": "saestream_normalized_mse",
    "Dead-latent fraction": "saestream_dead_latent_fraction",
    "L0": "saestream_l0",
    "AuxK loss": "saestream_auxk_loss",
    "Trained tokens/s": "saestream_trained_tokens_total",
    "Received tokens/s by producer": "saestream_received_tokens_total",
    "Shuffle buffer fill": "saestream_buffer_capacity_tokens",
    "Training step time": "saestream_train_step_seconds_bucket",
    "Skipped steps (loss not finite)": "saestream_skipped_steps_total",
    "Compression ratio": "saestream_producer_wire_bytes_total",
    "Send-blocked time": "saestream_producer_send_blocked_seconds_total",
    "Rejected messages/s by reason": "saestream_rejected_messages_total",
    "Time since last checkpoint": "saestream_last_checkpoint_timestamp_seconds",
    "ΔCE by training step": "saestream_eval_delta_ce",
    "Loss recovered by training step": "saestream_eval_loss_recovered",
    "KL by training step": "saestream_eval_kl",
    "Age of the evaluated snapshot": "saestream_eval_snapshot_timestamp_seconds",
    "Evaluation failures by reason": "saestream_eval_failures_total",
}


def test_dashboard_has_datasource_and_hook_sae_producer_variables() -> None:
    d = dashboard()
    assert d["uid"] == "saestream" and d["title"]
    variables = {v["name"]: v for v in d["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    for name in ("hook", "sae", "producer"):
        v = variables[name]
        assert v["type"] == "query"
        assert v["datasource"] == {"type": "prometheus", "uid": "${datasource}"}
        assert v["definition"].startswith("label_values(") and f", {name})" in v["definition"]
        assert v["query"]["query"] == v["definition"]
        assert v["includeAll"] and v["allValue"] == ".*"
    used = " ".join(e for _, e in dashboard_exprs(d)) + " ".join(
        v.get("definition", "") for v in variables.values()
    )
    for name in ("hook", "sae", "producer"):
        assert f"${name}" in used, f"variable {name} filters nothing"


def test_dashboard_has_a_panel_for_each_required_view() -> None:
    d = dashboard()
    panels = {p["title"]: p for p in dashboard_panels(d) if p["type"] != "row"}
    for title, metric in REQUIRED_PANELS.items():
        assert title in panels, title
        assert any(metric in t["expr"] for t in panels[title]["targets"]), title
    legends = {t["legendFormat"] for t in panels["Training step time"]["targets"]}
    assert legends == {"p50", "p99"}
    assert "{{producer}}" in panels["Received tokens/s by producer"]["targets"][0]["legendFormat"]


def rows(d: dict) -> dict[str, list[dict]]:
    """Row title -> the panels laid out under it (down to the next row)."""
    top = sorted(d["panels"], key=lambda p: (p["gridPos"]["y"], p["gridPos"]["x"]))
    out: dict[str, list[dict]] = {}
    current: list[dict] = []
    for p in top:
        if p["type"] == "row":
            current = out.setdefault(p["title"], [])
            current.extend(p.get("panels", []))  # a collapsed row holds its panels
        else:
            current.append(p)
    return out


def test_dashboard_downstream_row_plots_delta_ce_loss_recovered_and_kl_against_step() -> None:
    """XY charts: x = the evaluated snapshot's step, y = the figure of each selected SAE.
    The two queries are joined on time (same target, same scrape), and the auto mapping
    plots every numeric column but x against x. pluginVersion keeps Grafana from running the
    pre-11 XY-chart option migration on these (already current) options."""
    panels = {p["title"]: p for p in rows(dashboard())["Downstream"]}
    for title, metric in (("ΔCE by training step", "saestream_eval_delta_ce"),
                          ("Loss recovered by training step", "saestream_eval_loss_recovered"),
                          ("KL by training step", "saestream_eval_kl")):
        p = panels[title]
        assert p["type"] == "xychart" and p["pluginVersion"].startswith("11."), title
        by_legend = {t["legendFormat"]: t["expr"] for t in p["targets"]}
        x_name = p["options"]["series"][0]["x"]["matcher"]
        assert p["options"]["mapping"] == "auto"
        assert x_name == {"id": "byName", "options": "step"}, title
        assert re.fullmatch(r'max\(saestream_eval_snapshot_step\{hook=~"\$hook", '
                            r'sae=~"\$sae"\}\)', by_legend["step"]), title
        (y,) = [e for legend, e in by_legend.items() if legend != "step"]
        assert y == metric + '{hook=~"$hook", sae=~"$sae"}', title
        assert p["transformations"] == [
            {"id": "joinByField", "options": {"byField": "Time", "mode": "outer"}}], title
    assert panels["Loss recovered by training step"]["fieldConfig"]["defaults"]["unit"] == (
        "percentunit")
    # and how current the figures are, and what the evaluator could not score
    assert {"Age of the evaluated snapshot", "Evaluation failures by reason"} <= set(panels)


def test_dashboard_layout_and_queries_are_well_formed() -> None:
    d = dashboard()
    ids = [p["id"] for p in dashboard_panels(d)]
    assert len(ids) == len(set(ids))
    cells: set[tuple[int, int]] = set()
    for p in dashboard_panels(d):
        g = p["gridPos"]
        assert g["x"] >= 0 and g["w"] > 0 and g["x"] + g["w"] <= 24, p["title"]
        xs, ys = range(g["x"], g["x"] + g["w"]), range(g["y"], g["y"] + g["h"])
        mine = {(x, y) for x in xs for y in ys}
        assert not mine & cells, f"panel {p['title']!r} overlaps another"
        cells |= mine
        if p["type"] == "row":
            continue
        assert p["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, p["title"]
        assert p["description"], p["title"]
        assert p["fieldConfig"]["defaults"]["unit"], p["title"]
        refs = [t["refId"] for t in p["targets"]]
        assert refs and len(refs) == len(set(refs)), p["title"]
        for t in p["targets"]:
            assert t["datasource"] == p["datasource"] and t["expr"].strip(), p["title"]
            if "rate(" in t["expr"]:
                assert "[$__rate_interval]" in t["expr"], (p["title"], t["expr"])


def test_dashboard_uses_only_metrics_the_daemons_export() -> None:
    known = exported_metric_names()
    for title, expr in dashboard_exprs(dashboard()):
        unknown = metric_names_in(expr) - known
        assert not unknown, (title, unknown)


def test_dashboard_expressions_parse_with_promtool(tmp_path: Path) -> None:
    """Each query, variables substituted, as a recording rule: promtool parses all PromQL."""
    d = dashboard()
    exprs = [substitute(e) for _, e in dashboard_exprs(d)]
    exprs += [
        substitute(re.sub(r"^label_values\((.*), \w+\)$", r"\1", v["definition"]))
        for v in d["templating"]["list"] if v["type"] == "query"
    ]
    rules = {"groups": [{"name": "dashboard", "rules": [
        {"record": f"dashboard:expr:{i}", "expr": e} for i, e in enumerate(exprs)
    ]}]}
    path = tmp_path / "dashboard-rules.yml"
    path.write_text(yaml.safe_dump(rules))
    res = run([tool("promtool"), "check", "rules", str(path)])
    assert res.returncode == 0, res.stdout + res.stderr
    assert f"SUCCESS: {len(exprs)} rules found" in res.stdout


def test_grafana_provisioning_points_at_prometheus_and_the_dashboard_folder() -> None:
    prov = DEPLOY / "grafana" / "provisioning"
    ds = yaml.safe_load((prov / "datasources" / "prometheus.yml").read_text())
    assert ds["apiVersion"] == 1
    (source,) = ds["datasources"]
    assert source["type"] == "prometheus" and source["isDefault"]
    assert source["url"] == "http://prometheus:9090"  # the compose service
    dash = yaml.safe_load((prov / "dashboards" / "saestream.yml").read_text())
    (provider,) = dash["providers"]
    assert provider["type"] == "file"
    compose = yaml.safe_load(COMPOSE.read_text())
    mounts = compose["services"]["grafana"]["volumes"]
    assert f"./grafana/dashboards:{provider['options']['path']}:ro" in mounts
    assert "./grafana/provisioning:/etc/grafana/provisioning:ro" in mounts


# ================================================================ containers


def test_compose_file_passes_docker_compose_config() -> None:
    for files in ([COMPOSE], [COMPOSE, COMPOSE_GPU]):
        argv = [tool("docker-compose")]
        for f in files:
            argv += ["-f", str(f)]
        res = run([*argv, "config", "-q"], cwd=DEPLOY)
        assert res.returncode == 0, res.stdout + res.stderr
        assert res.stderr.strip() == "", res.stderr


def test_compose_files_match_the_compose_specification() -> None:
    res = run([
        tool("check-jsonschema"), "--builtin-schema", "vendor.compose-spec",
        str(COMPOSE), str(COMPOSE_GPU),
    ])
    assert res.returncode == 0, res.stdout + res.stderr


def test_compose_wires_consumer_scalable_producers_prometheus_and_grafana() -> None:
    res = run([tool("docker-compose"), "-f", str(COMPOSE), "config"], cwd=DEPLOY)
    assert res.returncode == 0, res.stderr
    cfg = yaml.safe_load(res.stdout)  # the resolved file, defaults interpolated
    s = cfg["services"]
    assert set(s) == {"consumer", "producer", "evaluator", "prometheus", "grafana"}
    producer, consumer = s["producer"], s["consumer"]
    # --scale producer=N: no fixed name, no host port
    assert "container_name" not in producer and "ports" not in producer
    assert "--connect=tcp://consumer:5557" in producer["command"]
    assert "--bind=tcp://0.0.0.0:5557" in consumer["command"]
    for svc, port in ((consumer, 9101), (producer, 9102)):
        assert "--metrics-addr=0.0.0.0" in svc["command"]
        assert f"--metrics-port={port}" in svc["command"]
    assert "--resume" in consumer["command"]
    assert any(v.startswith("checkpoints:") for v in consumer["volumes"]) or any(
        v.get("source") == "checkpoints" for v in consumer["volumes"] if isinstance(v, dict)
    )
    assert "checkpoints" in cfg["volumes"]
    assert consumer["stop_signal"] == "SIGTERM"
    assert consumer["stop_grace_period"] in ("5m", "300s")
    assert s["consumer"]["build"]["dockerfile"] == "deploy/Dockerfile"
    prom_mount = next(v for v in s["prometheus"]["volumes"] if "/etc/prometheus" in str(v))
    assert str(DEPLOY / "prometheus") in str(prom_mount) or "./prometheus" in str(prom_mount)
    assert "docker compose -f deploy/docker-compose.yml kill -s SIGUSR1 consumer" in (
        COMPOSE.read_text()
    )


def _mounts(service: dict) -> dict[str, dict]:
    """Target path -> {source, read_only} of a resolved compose service's volumes."""
    out = {}
    for v in service.get("volumes", []):
        if isinstance(v, str):
            source, target, *mode = v.split(":")
            v = {"source": source, "target": target, "read_only": mode == ["ro"]}
        out[v["target"]] = {"source": v["source"], "read_only": bool(v.get("read_only"))}
    return out


def _flag(argv: list[str], name: str) -> str:
    (value,) = [a.partition("=")[2] for a in argv if a.partition("=")[0] == name]
    return value


def test_compose_evaluator_reads_the_consumer_checkpoint_volume_read_only() -> None:
    res = run([tool("docker-compose"), "-f", str(COMPOSE), "config"], cwd=DEPLOY)
    assert res.returncode == 0, res.stderr
    s = yaml.safe_load(res.stdout)["services"]
    consumer, evaluator = s["consumer"], s["evaluator"]
    assert evaluator["image"] == consumer["image"]
    assert evaluator["command"][0] == "evaluator"
    cmd = evaluator["command"]
    assert "--metrics-addr=0.0.0.0" in cmd and "--metrics-port=9103" in cmd
    # the consumer's checkpoint directory, through the same volume, mounted read-only
    ckpt = _flag(cmd, "--checkpoint-dir")
    assert ckpt == _flag(consumer["command"], "--checkpoint-dir")
    c_mounts, e_mounts = _mounts(consumer), _mounts(evaluator)
    (c_target,) = [t for t in c_mounts if ckpt.startswith(t + "/")]
    (e_target,) = [t for t in e_mounts if ckpt.startswith(t + "/")]
    assert c_target == e_target
    assert e_mounts[e_target] == {"source": c_mounts[c_target]["source"], "read_only": True}
    assert not c_mounts[c_target]["read_only"]
    # the history goes to a writable volume of its own
    history = _flag(cmd, "--history")
    (h_target,) = [t for t in e_mounts if history.startswith(t + "/")]
    assert not e_mounts[h_target]["read_only"]
    assert e_mounts[h_target]["source"] != c_mounts[c_target]["source"]
    assert evaluator["stop_signal"] == "SIGTERM"
    assert any(d == "consumer" for d in evaluator["depends_on"])
    # the GPU override gives it a GPU like the others
    gpu = yaml.safe_load(COMPOSE_GPU.read_text())["services"]
    assert set(gpu) == {"consumer", "producer", "evaluator"}


def test_dockerfile_passes_hadolint() -> None:
    res = run([tool("hadolint"), "--no-color", str(DEPLOY / "Dockerfile")])
    assert res.returncode == 0, res.stdout + res.stderr


def test_dockerfile_is_cpu_by_default_with_a_cuda_base_by_build_argument() -> None:
    text = (DEPLOY / "Dockerfile").read_text()
    assert re.search(r"^ARG BASE_IMAGE=python:\S+$", text, re.M)
    assert "FROM ${BASE_IMAGE}" in text
    assert "ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu" in text
    assert "--build-arg BASE_IMAGE=nvidia/cuda:" in text
    assert 'ENTRYPOINT ["tini", "--", "saestream"]' in text  # signals reach the daemon
    ignore = (DEPLOY / "Dockerfile.dockerignore").read_text().split()
    assert "**" in ignore and "!common/**" in ignore  # .venv and checkpoints stay out


def test_dockerfile_copies_every_package_the_project_installs() -> None:
    """`pip install .` in the image needs every sub-package pyproject.toml lists: each is
    let through the build-context filter and copied (the evaluator was neither once)."""
    pyproject = (ROOT / "pyproject.toml").read_text()
    listed = re.search(r"^packages = \[(.*?)\]", pyproject, re.M | re.S).group(1)
    folders = re.findall(r'"saestream\.(\w+)"', listed)
    assert "evaluator" in folders and "consumer" in folders, folders
    text = (DEPLOY / "Dockerfile").read_text()
    ignore = (DEPLOY / "Dockerfile.dockerignore").read_text().split()
    for folder in folders:
        assert f"!{folder}/**" in ignore, folder
        assert re.search(rf"^COPY {folder} \./{folder}$", text, re.M), folder


# ================================================================ systemd


def _units_for_verify(tmp_path: Path) -> Path:
    """The units with their install prefix pointing at this checkout's venv."""
    prefix = tmp_path / "opt" / "saestream" / ".venv" / "bin"
    prefix.mkdir(parents=True)
    for script in ("saestream", "torchrun"):
        (prefix / script).symlink_to(Path(sys.executable).parent / script)
    for unit in SYSTEMD.glob("*.service"):
        text = unit.read_text().replace(UNIT_PREFIX, str(tmp_path / "opt" / "saestream" / ".venv"))
        (tmp_path / unit.name).write_text(text)
    return tmp_path


def test_systemd_units_pass_systemd_analyze_verify(tmp_path: Path) -> None:
    if not (Path(sys.executable).parent / "saestream").exists():
        pytest.skip("console script saestream not installed in this environment")
    work = _units_for_verify(tmp_path)
    res = run(
        [tool("systemd-analyze"), "verify", "./saestream-consumer.service",
         "./saestream-producer@0.service", "./saestream-producer@3.service",
         "./saestream-evaluator.service", "./saestream-consumer-dp.service"],
        cwd=work,
    )
    ours = [ln for ln in (res.stdout + res.stderr).splitlines() if "saestream" in ln]
    assert res.returncode == 0 and not ours, res.stdout + res.stderr


def test_systemd_analyze_verify_catches_a_broken_unit(tmp_path: Path) -> None:
    """The check above would see a mistake: systemd-analyze reports it."""
    if not (Path(sys.executable).parent / "saestream").exists():
        pytest.skip("console script saestream not installed in this environment")
    work = _units_for_verify(tmp_path)
    unit = work / "saestream-consumer.service"
    unit.write_text(unit.read_text().replace("TimeoutStopSec=", "TimeoutStopSecs="))
    res = run([tool("systemd-analyze"), "verify", "./saestream-consumer.service"], cwd=work)
    assert "Unknown key 'TimeoutStopSecs'" in res.stdout + res.stderr


def unit_settings(path: Path) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    text = re.sub(r"\\\n\s*", " ", path.read_text())
    for line in text.splitlines():
        if "=" in line and not line.startswith(("#", ";", "[")):
            key, _, value = line.partition("=")
            out.setdefault(key.strip(), []).append(value.strip())
    return out


def test_systemd_consumer_reload_snapshots_and_stop_waits_for_the_final_checkpoint() -> None:
    s = unit_settings(SYSTEMD / "saestream-consumer.service")
    assert s["ExecReload"] == ["/bin/kill -USR1 $MAINPID"]
    assert s["KillSignal"] == ["SIGTERM"]
    minutes = int(re.fullmatch(r"(\d+)min", s["TimeoutStopSec"][0]).group(1))
    assert minutes >= 5
    assert s["EnvironmentFile"] == ["/etc/saestream/saestream.env"]
    assert "--resume" in s["ExecStart"][0]


def test_systemd_producer_template_runs_one_instance_per_gpu_and_shard() -> None:
    s = unit_settings(SYSTEMD / "saestream-producer@.service")
    start = s["ExecStart"][0]
    assert "--shard %i/${SAESTREAM_SHARDS}" in start
    assert "--state-file /var/lib/saestream/producer-%i.state" in start
    assert "SAESTREAM_PRODUCER_DEVICE=cuda:%i" in s["Environment"]
    assert "-/etc/saestream/producer-%i.env" in s["EnvironmentFile"]
    env = _env_file(SYSTEMD / "saestream.env")
    # every ${VAR} the units use is set by the env file or by the unit itself
    for unit in SYSTEMD.glob("*.service"):
        settings = unit_settings(unit)
        own = {e.partition("=")[0] for e in settings.get("Environment", [])}
        used = set(re.findall(r"\$\{?([A-Z_]+)\}?", settings["ExecStart"][0])) - {"MAINPID"}
        assert used <= set(env) | own, (unit.name, used - set(env) - own)


def test_systemd_evaluator_reads_the_consumer_checkpoints_read_only() -> None:
    c = unit_settings(SYSTEMD / "saestream-consumer.service")
    e = unit_settings(SYSTEMD / "saestream-evaluator.service")

    def flag(start: str, name: str) -> str:
        argv = start.split()
        return argv[argv.index(name) + 1]

    start = e["ExecStart"][0]
    assert start.split()[1] == "evaluator"
    ckpt = flag(start, "--checkpoint-dir")
    assert ckpt == flag(c["ExecStart"][0], "--checkpoint-dir")
    # the consumer's state directory, read-only for the evaluator (same user); optional, so
    # that the evaluator starts before the consumer ever ran
    state = "/var/lib/" + c["StateDirectory"][0]
    assert ckpt.startswith(state + "/")
    assert e["ReadOnlyPaths"] == [f"-{state}"]
    assert e["ProtectSystem"] == ["strict"]
    # the history in a state directory of its own, outside the read-only one
    history = flag(start, "--history")
    (own,) = e["StateDirectory"]
    assert own != c["StateDirectory"][0] and history.startswith(f"/var/lib/{own}/")
    assert "--metrics-port ${SAESTREAM_EVALUATOR_METRICS_PORT}" in start
    assert e["EnvironmentFile"] == c["EnvironmentFile"]
    assert "saestream-consumer.service" in e["After"][0].split()
    assert e["KillSignal"] == ["SIGTERM"]
    env = _env_file(SYSTEMD / "saestream.env")
    assert env["SAESTREAM_EVALUATOR_METRICS_PORT"] == "9103"


def _env_file(path: Path) -> dict[str, str]:
    out = {}
    for line in path.read_text().splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            key, eq, value = line.partition("=")
            assert eq and re.fullmatch(r"[A-Z_][A-Z0-9_]*", key), line
            out[key] = value
    return out


# ================================================================ Kubernetes


def k8s_docs() -> list[tuple[Path, dict]]:
    kust = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    return [(K8S / f, d) for f in kust["resources"] for d in load_yaml_docs(K8S / f)]


def k8s_dp_docs() -> list[tuple[Path, dict]]:
    """The data-parallel overlay's own manifests (its base is deploy/k8s)."""
    kust = yaml.safe_load((K8S_DP / "kustomization.yaml").read_text())
    return [(K8S_DP / f, d) for f in kust["resources"] if f.endswith(".yaml")
            for d in load_yaml_docs(K8S_DP / f)]


def test_k8s_manifests_pass_kubernetes_schema_validation() -> None:
    files = sorted({str(p) for p, _ in k8s_docs()})
    res = run([tool("kubernetes-validate"), "--strict", *files])
    assert res.returncode == 0, res.stdout + res.stderr
    assert res.stdout.count("passed for resource") == len(k8s_docs()), res.stdout


def test_k8s_schema_validation_catches_a_misspelt_field(tmp_path: Path) -> None:
    bad = tmp_path / "producer.yaml"
    bad.write_text((K8S / "producer.yaml").read_text().replace("  replicas: 2", "  replica: 2"))
    res = run([tool("kubernetes-validate"), "--strict", str(bad)])
    assert res.returncode != 0 and "replica" in res.stdout + res.stderr


def test_kustomization_lists_every_manifest() -> None:
    kust = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    on_disk = {p.name for p in K8S.glob("*.yaml")} - {"kustomization.yaml"}
    assert set(kust["resources"]) == on_disk


def test_k8s_evaluator_mounts_the_consumer_checkpoint_claim_read_only() -> None:
    objs = {(d["kind"], d["metadata"]["name"]): d for _, d in k8s_docs()}
    sts = objs[("StatefulSet", "saestream-consumer")]
    dep = objs[("Deployment", "saestream-evaluator")]
    pvc = objs[("PersistentVolumeClaim", "saestream-checkpoints")]
    assert dep["spec"]["replicas"] == 1
    pod = dep["spec"]["template"]["spec"]
    (c,) = pod["containers"]
    assert c["args"][0] == "evaluator"
    volumes = {v["name"]: v for v in pod["volumes"]}
    claims = {v["persistentVolumeClaim"]["claimName"]: v for v in pod["volumes"]
              if "persistentVolumeClaim" in v}
    ckpt_volume = claims["saestream-checkpoints"]
    assert ckpt_volume["persistentVolumeClaim"]["readOnly"] is True
    (mount,) = [m for m in c["volumeMounts"] if m["name"] == ckpt_volume["name"]]
    assert mount["readOnly"] is True
    # the same path as in the consumer, and --checkpoint-dir under it
    (sc,) = sts["spec"]["template"]["spec"]["containers"]
    (c_mount,) = sc["volumeMounts"]
    assert mount["mountPath"] == c_mount["mountPath"]
    ckpt = next(a.partition("=")[2] for a in c["args"] if a.startswith("--checkpoint-dir="))
    assert ckpt == next(a.partition("=")[2] for a in sc["args"]
                        if a.startswith("--checkpoint-dir="))
    assert ckpt.startswith(mount["mountPath"] + "/")
    # the history on a writable volume that is not the checkpoint one
    history = next(a.partition("=")[2] for a in c["args"] if a.startswith("--history="))
    (h_mount,) = [m for m in c["volumeMounts"] if history.startswith(m["mountPath"] + "/")]
    assert not h_mount.get("readOnly") and h_mount["name"] != ckpt_volume["name"]
    assert "persistentVolumeClaim" in volumes[h_mount["name"]]
    # ReadWriteOnce = one node: the evaluator must run where the consumer runs
    if pvc["spec"]["accessModes"] == ["ReadWriteOnce"]:
        (term,) = pod["affinity"]["podAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]
        assert term["topologyKey"] == "kubernetes.io/hostname"
        assert term["labelSelector"]["matchLabels"] == sts["spec"]["selector"]["matchLabels"]
    ann = dep["spec"]["template"]["metadata"]["annotations"]
    assert ann["prometheus.io/scrape"] == "true" and ann["prometheus.io/port"] == "9103"
    assert "--metrics-port=9103" in c["args"] and "--metrics-addr=0.0.0.0" in c["args"]
    config = objs[("ConfigMap", "saestream-config")]["data"]
    used = set(re.findall(r"\$\(([A-Z_]+)\)", " ".join(c["args"])))
    assert used <= set(config), used - set(config)


def test_k8s_consumer_statefulset_service_pvc_and_producer_deployment() -> None:
    objs = {(d["kind"], d["metadata"]["name"]): d for _, d in k8s_docs()}
    sts = objs[("StatefulSet", "saestream-consumer")]
    dep = objs[("Deployment", "saestream-producer")]
    svc = objs[("Service", "saestream-consumer")]
    pvc = objs[("PersistentVolumeClaim", "saestream-checkpoints")]
    assert pvc["spec"]["accessModes"] == ["ReadWriteOnce"]
    pod = sts["spec"]["template"]["spec"]
    assert pod["volumes"][0]["persistentVolumeClaim"]["claimName"] == "saestream-checkpoints"
    assert pod["terminationGracePeriodSeconds"] >= 300
    (c,) = pod["containers"]
    assert c["lifecycle"]["preStop"]
    assert "--resume" in c["args"]
    # data, control (the data port + 1: producers ask there where to continue), metrics
    assert {p["port"] for p in svc["spec"]["ports"]} == {5557, 5558, 9101}
    assert svc["spec"]["selector"] == sts["spec"]["selector"]["matchLabels"]
    assert isinstance(dep["spec"]["replicas"], int)
    ppod = dep["spec"]["template"]["spec"]
    (pc,) = ppod["containers"]
    assert pc["resources"]["requests"]["nvidia.com/gpu"] == "1"
    assert "--connect=tcp://saestream-consumer:5557" in pc["args"]
    assert ppod["terminationGracePeriodSeconds"] >= 30
    for obj, port in ((sts, "9101"), (dep, "9102")):
        ann = obj["spec"]["template"]["metadata"]["annotations"]
        assert ann["prometheus.io/scrape"] == "true" and ann["prometheus.io/port"] == port
    # $(VAR) in args must come from the ConfigMap or the container's env
    config = objs[("ConfigMap", "saestream-config")]["data"]
    for container in (c, pc):
        names = set(config) | {e["name"] for e in container.get("env", [])}
        used = set(re.findall(r"\$\(([A-Z_]+)\)", " ".join(container["args"])))
        assert used <= names, used - names


# ================================================================ flags


def _after_torchrun(argv: list[str]) -> list[str]:
    """torchrun's arguments -> the saestream command they start (`-m saestream ROLE ...`)."""
    i = argv.index("-m")
    assert argv[i + 1] == "saestream", argv
    return argv[i + 2:]


def _command_lines() -> Iterator[tuple[str, str, list[str]]]:
    """(where, role, argv after the role) for every daemon command in deploy/."""
    compose = yaml.safe_load(COMPOSE.read_text())
    for role in ("consumer", "producer", "evaluator"):
        cmd = compose["services"][role]["command"]
        assert cmd[0] == role
        yield "docker-compose.yml", role, cmd[1:]
    # docker-compose.dp.yml starts the base file's consumer command under torchrun
    cmd = yaml.safe_load(COMPOSE_DP.read_text())["services"]["producer"]["command"]
    assert cmd[0] == "producer"
    yield "docker-compose.dp.yml", "producer", cmd[1:]
    for _, d in k8s_docs() + k8s_dp_docs():
        if d["kind"] in ("StatefulSet", "Deployment"):
            for c in d["spec"]["template"]["spec"]["containers"]:
                argv = c["args"]
                if c.get("command") == ["tini", "--", "torchrun"]:
                    argv = _after_torchrun(argv)
                yield f"k8s {d['metadata']['name']}", argv[0], argv[1:]
    for unit in SYSTEMD.glob("*.service"):
        argv = unit_settings(unit)["ExecStart"][0].split()
        if argv[0] == f"{UNIT_PREFIX}/bin/torchrun":
            argv = ["saestream", *_after_torchrun(argv)]
        assert argv[0] in (f"{UNIT_PREFIX}/bin/saestream", "saestream")
        yield unit.name, argv[1], argv[2:]


def test_deploy_files_pass_only_flags_the_daemons_accept() -> None:
    from saestream.consumer.cli import consumer
    from saestream.evaluator.daemon_cli import evaluator
    from saestream.producer.cli import producer

    accepted = {
        name: {o for p in cmd.params for o in (*p.opts, *p.secondary_opts)}
        for name, cmd in (("consumer", consumer), ("producer", producer),
                          ("evaluator", evaluator))
    }
    seen = set()
    for where, role, argv in _command_lines():
        for arg in argv:
            if arg.startswith("--"):
                flag = arg.partition("=")[0]
                assert flag in accepted[role], f"{where}: {role} has no option {flag}"
        seen.add((where, role))
    # consumer, producer and evaluator in compose, k8s and systemd; the data-parallel
    # consumer in k8s and systemd, and compose's producers connecting to its ranks
    assert len(seen) == 12


# ================================================================ README


def test_readme_operations_section_has_commands_for_each_task() -> None:
    text = (ROOT / "README.md").read_text()
    section = text.split("<!-- section:operations:begin -->")[1].split(
        "<!-- section:operations:end -->"
    )[0]
    for needle in (
        "docker compose -f deploy/docker-compose.yml up",  # start
        "--scale producer=",  # scale
        "kill -s SIGUSR1 consumer",  # snapshot
        "systemctl reload saestream-consumer",
        "saestream-producer@{0..3}",
        "kubectl -n saestream scale deployment/saestream-producer",
        "--resume",  # resume
        "saestream keygen",  # secure
        "--curve-secret-key",
        "saestream status",  # watch
        "promtool",
    ):
        assert needle in section, needle


def test_readme_operations_commands_use_only_real_subcommands_and_flags() -> None:
    import shlex

    from saestream.tools.cli import cli

    text = (ROOT / "README.md").read_text()
    section = text.split("<!-- section:operations:begin -->")[1].split(
        "<!-- section:operations:end -->"
    )[0]
    blocks = re.findall(r"```bash\n(.*?)```", section, re.S)
    lines = "\n".join(blocks).replace("\\\n", " ").splitlines()
    checked = 0
    for line in lines:
        argv = shlex.split(line.split("#")[0])
        if not argv or argv[0] != "saestream":
            continue
        cmd = cli.get_command(None, argv[1])  # type: ignore[arg-type]
        assert cmd is not None, line
        opts = {o for p in cmd.params for o in (*p.opts, *p.secondary_opts)}
        for arg in argv[2:]:
            if arg.startswith("--"):
                assert arg.partition("=")[0] in opts, f"{line}: no option {arg}"
        checked += 1
    assert checked >= 5


# ================================================================ data-parallel consumer
# deploy/docker-compose.dp.yml, deploy/systemd/saestream-consumer-dp.service and the
# deploy/k8s-data-parallel overlay: torchrun ranks, each binding the endpoints
# consumer/distributed.py's `rank_endpoints` gives it and serving /metrics on --metrics-port
# + its local rank; producers connect to every rank's data and control endpoints; Prometheus
# scrapes every rank and keeps the (global) training figures of rank 0 only.


def relabel(labels: dict[str, str], rules: list[dict]) -> dict[str, str] | None:
    """Prometheus's relabelling of one label set (replace, keep, drop, labeldrop, with its
    defaults): the result, or None when dropped."""
    out = dict(labels)
    for rule in rules:
        action = rule.get("action", "replace")
        regex = re.compile(rule.get("regex", "(.*)"))
        if action == "labeldrop":
            out = {k: v for k, v in out.items() if not regex.fullmatch(k)}
            continue
        value = rule.get("separator", ";").join(out.get(n, "") for n in
                                                rule.get("source_labels", []))
        match = regex.fullmatch(value)
        if action in ("keep", "drop"):
            if (match is None) == (action == "keep"):
                return None
            continue
        assert action == "replace", action
        if match is not None:
            template = re.sub(r"\$\{?(\w+)\}?", r"\\g<\1>", rule.get("replacement", "$1"))
            new = match.expand(template)
            if new:
                out[rule["target_label"]] = new
            else:
                out.pop(rule["target_label"], None)
    return out


def consumer_rank_series() -> tuple[set[str], set[str]]:
    """(names of every series a consumer rank serves, those without a `rank` label: the
    global batch's training figures, the same on every rank)."""
    from prometheus_client import Counter, Gauge, Histogram
    from prometheus_client.metrics import MetricWrapperBase

    from saestream.consumer.metrics import ConsumerMetrics

    m = ConsumerMetrics()
    for metric in vars(m).values():
        if isinstance(metric, MetricWrapperBase):
            child = metric.labels(*["x"] * len(metric._labelnames)) if metric._labelnames \
                else metric
            if isinstance(metric, Counter):
                child.inc()
            elif isinstance(metric, Gauge):
                child.set(1)
            elif isinstance(metric, Histogram):
                child.observe(1)
    samples = [s for f in m.served(1).collect() for s in f.samples]
    return {s.name for s in samples}, {s.name for s in samples if "rank" not in s.labels}


def scraped(job: dict, target: dict[str, str]) -> set[str] | None:
    """The series names Prometheus keeps from a consumer rank at `target` (its discovered
    labels) under `job`, None when the target is dropped; checks no helper label is left."""
    labels = relabel({"job": job["job_name"], **target}, job.get("relabel_configs", []))
    if labels is None:
        return None
    labels = {k: v for k, v in labels.items() if not k.startswith("__")}
    assert labels["role"] == "consumer", labels
    names, _ = consumer_rank_series()
    kept = set()
    for name in names:
        series = relabel({**labels, "__name__": name}, job.get("metric_relabel_configs", []))
        if series is not None:
            assert "training_copy" not in series, series
            kept.add(name)
    return kept


def test_prometheus_keeps_training_figures_from_consumer_rank_0_only() -> None:
    names, training = consumer_rank_series()
    assert {"saestream_trained_tokens_total", "saestream_normalized_mse"} <= training < names
    job = {j["job_name"]: j for j in
           yaml.safe_load((PROM / "prometheus.yml").read_text())["scrape_configs"]}[
        "saestream-consumer"]
    # compose: rank 0 is the static target; rank r >= 1 is the name consumer-metrics-<port>
    assert scraped(job, {"__address__": "consumer:9101", "role": "consumer"}) == names
    for r in range(1, 8):
        port = 9101 + r
        target = {"__address__": "172.18.0.5:9101", "__meta_dns_name": f"consumer-metrics-{port}"}
        assert relabel(target, job["relabel_configs"])["__address__"] == f"172.18.0.5:{port}"
        assert scraped(job, target) == names - training
    (dns,) = job["dns_sd_configs"]
    assert dns["names"] == [f"consumer-metrics-{9101 + r}" for r in range(1, 8)]
    # hosts: the example's rank 0 keeps them, its other ranks carry training_copy
    example = yaml.safe_load((PROM / "targets" / "consumers.example.yml").read_text())
    kept = [scraped(job, {"__address__": t, **g.get("labels", {})})
            for g in example for t in g["targets"]]
    assert kept == [names] + [names - training] * (len(kept) - 1) and len(kept) >= 2


def test_k8s_scrape_job_finds_every_rank_port_and_keeps_training_figures_once() -> None:
    cfg = yaml.safe_load((K8S_DP / "prometheus-scrape.yml").read_text())
    (job,) = cfg["scrape_configs"]
    assert job["job_name"] == "saestream-consumer"  # SaestreamConsumerDown covers the ranks
    (sd,) = job["kubernetes_sd_configs"]
    assert sd == {"role": "pod", "namespaces": {"names": ["saestream"]}}
    names, training = consumer_rank_series()
    sts = next(d for _, d in k8s_dp_docs() if d["kind"] == "StatefulSet")
    (c,) = sts["spec"]["template"]["spec"]["containers"]
    ports = [p["name"] for p in c["ports"]]
    for pod in range(sts["spec"]["replicas"]):
        for port in ports:
            target = {
                "__address__": f"10.0.{pod}.7:1",
                "__meta_kubernetes_pod_name": f"saestream-consumer-dp-{pod}",
                "__meta_kubernetes_pod_label_app_kubernetes_io_name": "saestream-consumer-dp",
                "__meta_kubernetes_pod_label_apps_kubernetes_io_pod_index": str(pod),
                "__meta_kubernetes_pod_container_port_name": port,
            }
            want = (None if not port.startswith("metrics-")
                    else names if (pod, port) == (0, "metrics-0") else names - training)
            assert scraped(job, target) == want, (pod, port)
    other = {"__meta_kubernetes_pod_label_app_kubernetes_io_name": "saestream-producer",
             "__meta_kubernetes_pod_container_port_name": "metrics-0"}
    assert relabel(other, job["relabel_configs"]) is None


def test_k8s_scrape_job_passes_promtool_but_for_its_kubernetes_discovery(tmp_path: Path) -> None:
    """Debian's promtool is built without Kubernetes discovery: the job is checked with a
    static target in its place (every relabelling rule and regex still parsed)."""
    cfg = yaml.safe_load((K8S_DP / "prometheus-scrape.yml").read_text())
    for job in cfg["scrape_configs"]:
        del job["kubernetes_sd_configs"]
        job["static_configs"] = [{"targets": ["saestream-consumer-dp-0:9101"]}]
    path = tmp_path / "prometheus.yml"
    path.write_text(yaml.safe_dump(cfg))
    res = run([tool("promtool"), "check", "config", str(path)])
    assert res.returncode == 0 and "WARNING" not in res.stdout + res.stderr, res.stdout + res.stderr


def _flag_value(argv: list[str], name: str) -> str:
    (value,) = [a.partition("=")[2] for a in argv if a.partition("=")[0] == name]
    return value


def _rank_layout(ranks: int, bind: str = "tcp://0.0.0.0:5557", metrics: int = 9101
                 ) -> dict[str, int]:
    """Port name -> port of local ranks 0 .. ranks - 1 under torchrun, as the consumer
    binds them (`rank_endpoints`) for one TCP --bind: zmq-r, control-r, metrics-r."""
    from saestream.consumer.distributed import rank_endpoints

    out = {}
    for r in range(ranks):
        data, control = rank_endpoints(bind, None, r, ranks)
        assert control is not None
        out |= {f"zmq-{r}": int(data.rpartition(":")[2]),
                f"control-{r}": int(control.rpartition(":")[2]), f"metrics-{r}": metrics + r}
    return out


def _endpoints(argv: list[str], flag: str) -> list[str]:
    return [a.partition("=")[2] for a in argv if a.partition("=")[0] == flag]


def test_k8s_data_parallel_manifests_pass_kubernetes_schema_validation() -> None:
    files = sorted({str(p) for p, _ in k8s_dp_docs()})
    res = run([tool("kubernetes-validate"), "--strict", *files])
    assert res.returncode == 0, res.stdout + res.stderr
    assert res.stdout.count("passed for resource") == len(k8s_dp_docs()), res.stdout


def kustomize(directory: Path) -> list[dict]:
    """`kubectl kustomize DIR` (kustomize built into kubectl; no cluster needed)."""
    kubectl = shutil.which("kubectl")
    if kubectl is None:  # `make deploy-tools` does not install it
        pytest.skip("kubectl not installed (its built-in kustomize renders the overlay)")
    res = run([kubectl, "kustomize", str(directory)])
    assert res.returncode == 0, res.stderr
    return [d for d in yaml.safe_load_all(res.stdout) if d is not None]


def test_k8s_data_parallel_overlay_renders_and_validates(tmp_path: Path) -> None:
    docs = kustomize(K8S_DP)
    rendered = tmp_path / "rendered.yaml"
    rendered.write_text(yaml.safe_dump_all(docs))
    res = run([tool("kubernetes-validate"), "--strict", str(rendered)])
    assert res.returncode == 0, res.stdout + res.stderr
    assert res.stdout.count("passed for resource") == len(docs), res.stdout
    base = {(d["kind"], d["metadata"]["name"]) for _, d in k8s_docs()}
    here = {(d["kind"], d["metadata"]["name"]) for d in docs}
    gone = {("StatefulSet", "saestream-consumer"), ("Service", "saestream-consumer")}
    assert here == (base - gone) | {("StatefulSet", "saestream-consumer-dp"),
                                    ("Service", "saestream-consumer-dp")}


def test_k8s_data_parallel_consumer_ranks_rendezvous_ports_and_producers_agree() -> None:
    docs = {(d["kind"], d["metadata"]["name"]): d for d in kustomize(K8S_DP)}
    sts = docs[("StatefulSet", "saestream-consumer-dp")]
    svc = docs[("Service", "saestream-consumer-dp")]
    assert svc["spec"]["clusterIP"] == "None" and svc["spec"]["publishNotReadyAddresses"]
    assert sts["spec"]["serviceName"] == svc["metadata"]["name"]
    assert svc["spec"]["selector"] == sts["spec"]["selector"]["matchLabels"]
    assert sts["spec"]["podManagementPolicy"] == "Parallel"
    pod = sts["spec"]["template"]["spec"]
    (c,) = pod["containers"]
    assert c["command"] == ["tini", "--", "torchrun"]
    args, nodes = c["args"], sts["spec"]["replicas"]
    per_pod = int(_flag_value(args, "--nproc-per-node"))
    assert int(_flag_value(args, "--nnodes")) == nodes
    gpus = {c["resources"][k]["nvidia.com/gpu"] for k in ("requests", "limits")}
    assert gpus == {str(per_pod)}
    # static rendezvous at pod 0 (global rank 0, which writes the snapshots, is there)
    assert _flag_value(args, "--node-rank") == "$(POD_INDEX)"
    (env,) = [e for e in c["env"] if e["name"] == "POD_INDEX"]
    assert env["valueFrom"]["fieldRef"]["fieldPath"] == (
        "metadata.labels['apps.kubernetes.io/pod-index']")
    assert _flag_value(args, "--master-addr") == (
        f"{sts['metadata']['name']}-0.{svc['metadata']['name']}")
    master = int(_flag_value(args, "--master-port"))
    assert int(_flag_value(args, "--shutdown-timeout")) < pod["terminationGracePeriodSeconds"]
    consumer = _after_torchrun(args)
    assert consumer[0] == "consumer" and "--resume" in consumer
    assert _flag_value(consumer, "--bind") == "tcp://0.0.0.0:5557"
    assert _flag_value(consumer, "--metrics-port") == "9101"
    # every local rank's ports, in the container and in the Service
    want = _rank_layout(per_pod) | {"rendezvous": master}
    assert {p["name"]: p["containerPort"] for p in c["ports"]} == want
    assert {p["name"]: p["port"] for p in svc["spec"]["ports"]} == want
    # the producers connect to every rank of every pod, data and control
    (pc,) = docs[("Deployment", "saestream-producer")]["spec"]["template"]["spec"]["containers"]
    hosts = [f"{sts['metadata']['name']}-{i}.{svc['metadata']['name']}" for i in range(nodes)]
    for flag, kind in (("--connect", "zmq"), ("--control-connect", "control")):
        assert sorted(_endpoints(pc["args"], flag)) == sorted(
            f"tcp://{h}:{want[f'{kind}-{r}']}" for h in hosts for r in range(per_pod)), flag
    # snapshots: SIGUSR1 to the ranks (torchrun's children), never to torchrun itself
    assert "pkill -USR1 -P \"$(pgrep -P 1)\"" in c["lifecycle"]["preStop"]["exec"]["command"][2]
    ann = sts["spec"]["template"]["metadata"]["annotations"]
    assert ann["prometheus.io/scrape"] == "false"  # prometheus-scrape.yml's job instead
    # every rank reads the snapshot it resumes from: one ReadWriteMany claim, and the
    # evaluator reads it from any node
    pvc = docs[("PersistentVolumeClaim", "saestream-checkpoints")]
    assert pvc["spec"]["accessModes"] == ["ReadWriteMany"]
    (claim,) = [v for v in pod["volumes"] if "persistentVolumeClaim" in v]
    assert claim["persistentVolumeClaim"]["claimName"] == "saestream-checkpoints"
    evaluator = docs[("Deployment", "saestream-evaluator")]["spec"]["template"]["spec"]
    assert "affinity" not in evaluator
    assert any(v.get("persistentVolumeClaim", {}).get("claimName") == "saestream-checkpoints"
               for v in evaluator["volumes"])
    config = docs[("ConfigMap", "saestream-config")]["data"]
    used = set(re.findall(r"\$\(([A-Z_]+)\)", " ".join(args)))
    assert used <= set(config) | {e["name"] for e in c["env"]}


def test_compose_data_parallel_consumer_ranks_gpus_ports_and_producers_agree() -> None:
    res = run([tool("docker-compose"), "-f", str(COMPOSE), "-f", str(COMPOSE_DP), "config"],
              cwd=DEPLOY)
    assert res.returncode == 0 and res.stderr.strip() == "", res.stderr
    s = yaml.safe_load(res.stdout)["services"]
    base = yaml.safe_load(run([tool("docker-compose"), "-f", str(COMPOSE), "config"],
                              cwd=DEPLOY).stdout)["services"]
    consumer, producer = s["consumer"], s["producer"]
    entry = consumer["entrypoint"]
    assert entry[:3] == ["tini", "--", "torchrun"] and "--standalone" in entry
    assert entry[-2:] == ["-m", "saestream"] and consumer["command"] == base["consumer"]["command"]
    ranks = int(_flag_value(entry, "--nproc-per-node"))
    assert ranks >= 2
    grace = {"5m": 300, "300s": 300}[consumer["stop_grace_period"]]
    assert int(_flag_value(entry, "--shutdown-timeout")) < grace
    (gpus,) = consumer["deploy"]["resources"]["reservations"]["devices"]
    assert gpus["device_ids"] == [str(r) for r in range(ranks)]  # rank r on cuda:r
    layout = _rank_layout(ranks)
    assert sorted(consumer["expose"], key=int) == sorted(str(p) for p in layout.values())
    aliases = consumer["networks"]["default"]["aliases"]
    assert aliases == [f"consumer-metrics-{9101 + r}" for r in range(1, ranks)]
    prom = {j["job_name"]: j for j in
            yaml.safe_load((PROM / "prometheus.yml").read_text())["scrape_configs"]}
    assert set(aliases) <= set(prom["saestream-consumer"]["dns_sd_configs"][0]["names"])
    # the producers: the base command, connecting to every rank's data and control endpoints
    for flag, kind in (("--connect", "zmq"), ("--control-connect", "control")):
        assert _endpoints(producer["command"], flag) == [
            f"tcp://consumer:{layout[f'{kind}-{r}']}" for r in range(ranks)], flag

    def others(cmd: list[str]) -> list[str]:
        return [a for a in cmd if not a.startswith(("--connect=", "--control-connect="))]

    assert others(producer["command"]) == others(base["producer"]["command"])
    # it replaces docker-compose.gpu.yml: the producers and the evaluator get their GPU too
    gpu = yaml.safe_load(COMPOSE_GPU.read_text())["services"]
    dp = yaml.safe_load(COMPOSE_DP.read_text())["services"]
    for name in ("producer", "evaluator"):
        assert dp[name]["deploy"] == gpu[name]["deploy"], name
    assert "exec consumer sh -c 'pkill -USR1 -P \"$(pgrep -P 1)\"'" in COMPOSE_DP.read_text()
    res = run([tool("check-jsonschema"), "--builtin-schema", "vendor.compose-spec",
               str(COMPOSE_DP)])
    assert res.returncode == 0, res.stdout + res.stderr


def test_systemd_data_parallel_consumer_signals_its_ranks_and_clears_other_ports() -> None:
    s = unit_settings(SYSTEMD / "saestream-consumer-dp.service")
    argv = s["ExecStart"][0].split()
    assert argv[0] == f"{UNIT_PREFIX}/bin/torchrun" and "--standalone" in argv
    assert argv[argv.index("--nproc-per-node") + 1] == "${SAESTREAM_CONSUMER_RANKS}"
    minutes = int(re.fullmatch(r"(\d+)min", s["TimeoutStopSec"][0]).group(1))
    assert int(argv[argv.index("--shutdown-timeout") + 1]) < 60 * minutes
    consumer = _after_torchrun(argv)
    assert consumer[0] == "consumer" and "--resume" in consumer
    assert s["Conflicts"] == ["saestream-consumer.service"]
    # SIGUSR1 and SIGTERM go to the ranks (torchrun's children): SIGUSR1 would end torchrun
    assert s["ExecReload"] == ["/usr/bin/pkill -USR1 --parent $MAINPID"]
    assert "pkill -TERM --parent" in s["ExecStop"][0] and "kill -0" in s["ExecStop"][0]
    assert s["KillMode"] == ["mixed"] and s["Restart"] == ["on-failure"]
    # rank r's /metrics on SAESTREAM_CONSUMER_DP_METRICS_PORT + r: clear of the one-process
    # consumer, the evaluator and the producers' 911I for up to 8 ranks on one host
    env = _env_file(SYSTEMD / "saestream.env")
    assert "--metrics-port ${SAESTREAM_CONSUMER_DP_METRICS_PORT}" in s["ExecStart"][0]
    base = int(env["SAESTREAM_CONSUMER_DP_METRICS_PORT"])
    taken = {int(env["SAESTREAM_CONSUMER_METRICS_PORT"]),
             int(env["SAESTREAM_EVALUATOR_METRICS_PORT"]), *range(9110, 9120)}
    assert not set(range(base, base + 8)) & taken
    ranks = int(env["SAESTREAM_CONSUMER_RANKS"])
    assert ranks >= 2
    # the producers' settings the env file shows connect to every rank's endpoints
    (example,) = re.findall(r"^#\s+SAESTREAM_PRODUCER_ARGS=(.*)$",
                            (SYSTEMD / "saestream.env").read_text(), re.M)
    argv = [f"--connect={env['SAESTREAM_CONNECT']}"] + [
        f"{f}={v}" for f, v in zip(example.split()[::2], example.split()[1::2], strict=True)]
    port = env["SAESTREAM_BIND"].rpartition(":")[2]
    layout = _rank_layout(ranks, f"tcp://0.0.0.0:{port}")
    for flag, kind in (("--connect", "zmq"), ("--control-connect", "control")):
        assert _endpoints(argv, flag) == [
            f"tcp://127.0.0.1:{layout[f'{kind}-{r}']}" for r in range(ranks)], flag


def test_readme_torchrun_commands_use_real_torchrun_and_saestream_flags() -> None:
    """The operations section's `torchrun ... -m saestream CMD ...` lines: torchrun's own
    parser takes them, and CMD and its flags are saestream's."""
    import shlex

    from torch.distributed.run import get_args_parser

    from saestream.tools.cli import cli

    text = (ROOT / "README.md").read_text()
    section = text.split("<!-- section:operations:begin -->")[1].split(
        "<!-- section:operations:end -->"
    )[0]
    blocks = re.findall(r"```bash\n(.*?)```", section, re.S)
    lines = [ln for ln in "\n".join(blocks).replace("\\\n", " ").splitlines()
             if ln.startswith("torchrun ")]
    for line in lines:
        args = get_args_parser().parse_args(shlex.split(line.split("#")[0])[1:])
        assert args.module and args.training_script == "saestream", line
        name, *rest = args.training_script_args
        cmd = cli.get_command(None, name)  # type: ignore[arg-type]
        assert cmd is not None, line
        opts = {o for p in cmd.params for o in (*p.opts, *p.secondary_opts)}
        for arg in rest:
            if arg.startswith("--"):
                assert arg.partition("=")[0] in opts, f"{line}: no option {arg}"
    assert {"train", "consumer"} <= {
        get_args_parser().parse_args(shlex.split(ln)[1:]).training_script_args[0]
        for ln in lines}


"""What the chart renders, read by the code that reads it in the pod.

The gateway's settings forbid unknown fields, so a key the chart writes that the gateway does
not know stops the pod at start. Here each value set is rendered, the files the containers
mount (ConfigMap and Secret volumes) are written out, their environment is rebuilt from
``env`` and ``envFrom`` (the chart's Secret, base64-decoded, or the documented content of an
``existingSecret``), and then:

- ``retort.yaml`` plus that environment go through ``gateway.settings.load_settings`` and the
  constructors that validate further (``Authenticator``, ``build_rate_limiter``, ``Pricer``,
  ``StudentPool``, ``Metrics``);
- the containers' arguments are parsed by the real ``retort`` CLI (click, without running);
- ``distill.yaml`` goes through ``distill.config.load_config``;
- every PromQL expression of the Grafana dashboard reads only series that a real ``/metrics``
  render exports, with their labels.
"""

from __future__ import annotations

import base64
import json
import re
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

import msgspec
import pytest
import typer
import yaml
from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families

from gateway.auth.keys import Authenticator
from gateway.auth.limits import build_rate_limiter
from gateway.auth.redis_limits import RedisRateLimiter
from gateway.metrics import DROP_REASONS, EngineStats, Metrics
from gateway.pricing import Pricer
from gateway.settings import Settings, load_settings
from gateway.studentpool import StudentPool
from gateway.students import StudentRegistry

from ._chart import CHART, EXISTING_SECRETS, TEST_KEYS, Rendered

STATE = "/var/lib/retort"
# Settings fields the chart sets itself (or takes from the Secret), so values.schema.json
# leaves them out of `config`.
CHART_MANAGED = {
    ("server", "host"),
    ("server", "port"),
    ("promptlog", "url"),
    ("auth", "api_keys"),
    ("limits", "redis_url"),
}
# Labels Prometheus adds to every scraped series (ServiceMonitor / kubernetes_sd).
TARGET_LABELS = {"namespace", "pod", "instance", "job", "service", "container", "endpoint"}


# --- the pod's view of the rendered manifests ------------------------------------------------


def _secret(r: Rendered, name: str) -> dict[str, str]:
    for s in r.of_kind("Secret"):
        if s["metadata"]["name"] == name:
            out = {k: base64.b64decode(v).decode() for k, v in s.get("data", {}).items()}
            out.update(s.get("stringData", {}))
            return out
    assert name in EXISTING_SECRETS, f"Secret {name} is neither rendered nor an existingSecret"
    return EXISTING_SECRETS[name]


def _configmap(r: Rendered, name: str) -> dict[str, str]:
    for cm in r.of_kind("ConfigMap"):
        if cm["metadata"]["name"] == name:
            data: dict[str, str] = cm["data"]
            return data
    raise AssertionError(f"no ConfigMap {name}")


@dataclass
class Pod:
    """One container as it runs: its args, environment and mounted files (under ``root``)."""

    args: list[str]
    environ: dict[str, str]
    root: Path

    def file(self, path: str) -> Path:
        local = self.root / PurePosixPath(path).relative_to("/")
        assert local.is_file(), f"{path} is not mounted in the container"
        return local

    def arg(self, flag: str) -> str:
        return self.args[self.args.index(flag) + 1]


def _pod(r: Rendered, pod: dict[str, Any], container: dict[str, Any], root: Path) -> Pod:
    environ: dict[str, str] = {}
    for src in container.get("envFrom", []):
        if "secretRef" in src:
            data = _secret(r, src["secretRef"]["name"])
        else:
            data = _configmap(r, src["configMapRef"]["name"])
        environ.update({src.get("prefix", "") + k: v for k, v in data.items()})
    for e in container.get("env", []):  # env wins over envFrom, as in Kubernetes
        environ[e["name"]] = e.get("value", f"<{e['name']} from valueFrom>")
    volumes = {v["name"]: v for v in pod["volumes"]}
    for mount in container.get("volumeMounts", []):
        volume = volumes[mount["name"]]
        if "configMap" in volume:
            source, data = volume["configMap"], _configmap(r, volume["configMap"]["name"])
        elif "secret" in volume:
            source, data = volume["secret"], _secret(r, volume["secret"]["secretName"])
        else:
            continue
        if source.get("items"):
            data = {i["path"]: data[i["key"]] for i in source["items"]}
        target = root / PurePosixPath(mount["mountPath"]).relative_to("/")
        if "subPath" in mount:
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_text(data[mount["subPath"]])
            continue
        for name, text in data.items():
            (target / name).parent.mkdir(parents=True, exist_ok=True)
            (target / name).write_text(text)
    return Pod(args=list(container.get("args", [])), environ=environ, root=root)


def _gateway(r: Rendered, root: Path) -> Pod:
    return _pod(r, r.pod_spec, r.container, root)


def _distill_jobs(r: Rendered, root: Path) -> list[Pod]:
    pods = []
    for i, cj in enumerate(r.of_kind("CronJob")):
        pod = cj["spec"]["jobTemplate"]["spec"]["template"]["spec"]
        (container,) = pod["containers"]
        pods.append(_pod(r, pod, container, root / f"job{i}"))
    return pods


def _load(pod: Pod, config: str) -> Settings:
    return load_settings(pod.file(config), environ=pod.environ)


def _expected_keys(r: Rendered) -> list[dict[str, Any]]:
    secrets = r.values.get("secrets", {})
    if secrets.get("existingSecret"):
        raw = EXISTING_SECRETS[secrets["existingSecret"]].get("RETORT_AUTH__API_KEYS", "")
        keys: list[dict[str, Any]] = yaml.safe_load(raw) or []
        return keys
    return list(secrets.get("apiKeys", []))


# --- the gateway ---------------------------------------------------------------------------


def test_gateway_settings_load_from_the_rendered_config(rendered: Rendered, tmp_path: Path) -> None:
    pod = _gateway(rendered, tmp_path)
    settings = _load(pod, pod.arg("--config"))
    assert settings.home == STATE, "RETORT_HOME is the state volume"
    assert settings.server.host == "0.0.0.0"
    assert settings.server.port == int(pod.arg("--port"))
    assert settings.server.port == rendered.container["ports"][0]["containerPort"]
    # Every value given under `config` arrives unchanged.
    for section, body in rendered.values.get("config", {}).items():
        got = msgspec.to_builtins(getattr(settings, section))
        for key, value in body.items():
            assert got[key] == value, f"config.{section}.{key}"
    secrets = rendered.values.get("secrets", {})
    existing = EXISTING_SECRETS.get(secrets.get("existingSecret", ""), {})
    url = secrets.get("databaseUrl") or existing.get("RETORT_PROMPTLOG__URL")
    assert settings.promptlog.url == (url or None)
    redis_url = secrets.get("redisUrl") or existing.get("RETORT_LIMITS__REDIS_URL")
    assert settings.limits.redis_url == (redis_url or None)


def test_gateway_components_accept_the_settings(rendered: Rendered, tmp_path: Path) -> None:
    pod = _gateway(rendered, tmp_path)
    settings = _load(pod, pod.arg("--config"))
    auth = settings.auth
    if auth.api_keys_file:  # a mounted keys file: read it where this test mounted it
        auth = msgspec.structs.replace(auth, api_keys_file=str(pod.file(auth.api_keys_file)))
    authenticator = Authenticator(auth)
    limiter = build_rate_limiter(settings.limits, authenticator)
    assert isinstance(limiter, RedisRateLimiter) == bool(settings.limits.redis_url)
    Pricer(settings.pricing)
    StudentPool(StudentRegistry(settings.students_path), settings.students)
    Metrics(CollectorRegistry(), key_label=settings.metrics.key_label)
    assert settings.students_path == Path(STATE) / "students"

    keys = _expected_keys(rendered)
    assert authenticator.enabled == bool(keys)
    assert set(authenticator.limits) == {k["id"] for k in keys}
    for k in keys:
        info = authenticator.check(f"Bearer {TEST_KEYS[k['id']]}")
        assert info is not None, f"key {k['id']} is not accepted"
        assert (info.id, info.admin) == (k["id"], k.get("admin", False))
        limits = authenticator.limits[k["id"]]
        for field in ("rpm", "tpm", "max_concurrent"):
            assert getattr(limits, field) == k.get(field)


def test_keys_reach_the_gateway_as_objects(render_set: Any, tmp_path: Path) -> None:
    env = render_set("cpu").secret_env()
    assert "RETORT_AUTH__ADMIN_KEYS" not in env
    keys = json.loads(env["RETORT_AUTH__API_KEYS"])
    assert all(isinstance(k, dict) and {"id", "sha256"} <= set(k) for k in keys)
    assert [k["id"] for k in keys if k.get("admin")] == ["ops"]


def test_every_settings_section_is_configurable_and_checked() -> None:
    """values.schema.json's `config` mirrors Settings: the same sections and fields, none
    more (the gateway would refuse it) and none missing (the chart could not set it)."""
    schema = json.loads((CHART / "values.schema.json").read_text())
    config = schema["properties"]["config"]
    assert config["additionalProperties"] is False
    structs = {f.name: f.type for f in msgspec.structs.fields(Settings) if f.name != "home"}
    assert set(config["properties"]) == set(structs)
    for section, struct in structs.items():
        node = config["properties"][section]
        assert node.get("additionalProperties") is False, f"config.{section} takes any key"
        fields = {f.name for f in msgspec.structs.fields(struct)}
        managed = {f for s, f in CHART_MANAGED if s == section}
        assert set(node["properties"]) == fields - managed, f"config.{section}"
    defs = schema["definitions"]
    from gateway.auth.keys import APIKey
    from gateway.pricing import ModelPrice
    from gateway.studentpool import TrafficSplit

    for name, struct in {
        "apiKey": APIKey,
        "modelPrice": ModelPrice,
        "trafficSplit": TrafficSplit,
    }.items():
        assert set(defs[name]["properties"]) == {f.name for f in msgspec.structs.fields(struct)}
        assert defs[name]["additionalProperties"] is False


# --- the CLI -----------------------------------------------------------------------------


def _parse(root: Any, args: list[str]) -> tuple[str, dict[str, Any]]:
    """Resolve ``args`` through the (click) command tree and parse the options, without
    running anything. Typer may vendor click, so groups are told by ``commands``."""
    ctx = root.context_class(root, info_name="retort")
    cmd, rest, path = root, list(args), []
    while hasattr(cmd, "commands"):
        assert rest, f"{' '.join(['retort', *path])} needs a command"
        name, rest = rest[0], rest[1:]
        sub = cmd.get_command(ctx, name)
        assert sub is not None, f"no command {name!r} in {' '.join(['retort', *path])}"
        path.append(name)
        ctx = sub.context_class(sub, info_name=name, parent=ctx)
        cmd = sub
    parsed = cmd.make_context(path[-1], rest, parent=ctx.parent, resilient_parsing=False)
    return " ".join(path), parsed.params


def _retort_cli() -> Any:
    from gateway.cli import app

    return typer.main.get_command(app)


def test_gateway_args_parse_with_the_retort_cli(rendered: Rendered) -> None:
    command, params = _parse(_retort_cli(), rendered.container["args"])
    assert command == "serve"
    assert str(params["config"]) == "/etc/retort/retort.yaml"
    assert params["port"] == rendered.container["ports"][0]["containerPort"]


def test_distill_job_args_parse_with_the_retort_cli(render_set: Any) -> None:
    for cj in render_set("gpu").of_kind("CronJob"):
        args = cj["spec"]["jobTemplate"]["spec"]["template"]["spec"]["containers"][0]["args"]
        assert _parse(_retort_cli(), args)[0] == "distill run"


@pytest.mark.parametrize("name", ["gpu", "cpu", "production"])
def test_distill_job_reads_its_config(render_set: Any, name: str, tmp_path: Path) -> None:
    from distill.config import load_config

    r = render_set(name)
    jobs = _distill_jobs(r, tmp_path)
    assert jobs
    for pod in jobs:
        cfg = load_config(pod.file(pod.arg("--config")), {"adapter": pod.arg("--adapter")})
        assert cfg.settings == "/etc/retort/retort.yaml"
        # The pipeline loads the gateway settings from there, with the job's environment.
        settings = _load(pod, cfg.settings)
        assert settings.home == STATE
        assert (
            settings.model == _load(_gateway(r, tmp_path / "gw"), "/etc/retort/retort.yaml").model
        )
        for section, body in r.values["distill"].get("config", {}).items():
            got = msgspec.to_builtins(getattr(cfg, section))
            assert {k: got[k] for k in body} == body


# --- the Grafana dashboard ----------------------------------------------------------------


def _render_metrics() -> str:
    """A real /metrics render after one of everything."""
    metrics = Metrics(CollectorRegistry(), key_label=True)
    metrics.request_started("base")
    metrics.observe_request(
        "base", "support-bot", "ok", 12, 30, 0.05, 0.9, 0.001, "app", endpoint="chat"
    )
    metrics.observe_request("base-student", None, "error", 12, 0, None, 0.1, 0.0, "app")
    metrics.observe_adapter_load("support-bot", 0.4)
    metrics.set_adapters_loaded(1)
    metrics.promptlog_written(3)
    metrics.promptlog_dropped("queue_full")
    metrics.set_promptlog_queue_depth(2)
    metrics.set_promptlog_degraded(True)
    metrics.promptlog_spooled(2)
    metrics.set_promptlog_spool_bytes(4096)
    metrics.set_limits_degraded(True)
    metrics.set_engine_stats(EngineStats(running=2, waiting=1, kv_cache_usage=0.3))
    metrics.shadow_request("support-bot", "support-bot-student", "agree")
    metrics.shadow_agreement("support-bot", "support-bot-student", 0.9)
    metrics.shadow_latency("support-bot", "support-bot-student", 0.2)
    metrics.structured_output_failed("base", "json_schema")
    metrics.rollout_state("support-bot", "support-bot-student", 1, 0.05)
    metrics.rollout_figures("support-bot", "support-bot-student", 0.95, 0.04)
    metrics.rollout_decision("support-bot", "support-bot-student", "advance")
    metrics.admission_rejected("full")
    metrics.watch_admission(lambda: 3)
    metrics.stream_stalled()
    return metrics.render().decode()


def _exported() -> dict[str, set[str]]:
    """Series name (``_total``, ``_bucket``, ...) -> its label names."""
    series: dict[str, set[str]] = {}
    for family in text_string_to_metric_families(_render_metrics()):
        for sample in family.samples:
            series.setdefault(sample.name, set()).update(sample.labels)
    return series


def _dashboard() -> dict[str, Any]:
    data: dict[str, Any] = json.loads((CHART / "dashboards" / "retort.json").read_text())
    return data


def _expressions(dash: dict[str, Any]) -> list[tuple[str, str]]:
    out = [(p["title"], t["expr"]) for p in dash["panels"] for t in p.get("targets", [])]
    for var in dash["templating"]["list"]:
        if var.get("type") == "query":
            query = var["query"]
            out.append((f"${var['name']}", query["query"] if isinstance(query, dict) else query))
    return out


_SELECTOR = re.compile(r"\b(retort_[a-z0-9_]+)\b(?:\{([^}]*)\})?")
_MATCHER = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)\s*(=~|!~|!=|=)\s*"([^"]*)"')
_GROUPING = re.compile(r"\b(?:by|without)\s*\(([^)]*)\)")


def test_dashboard_reads_only_exported_series() -> None:
    exported = _exported()
    bounded = {"status": {"ok", "error"}, "reason": set(DROP_REASONS)}
    for title, expr in _expressions(_dashboard()):
        labels = set(TARGET_LABELS)
        selectors = _SELECTOR.findall(expr)
        assert selectors, f"{title}: reads no retort_ series: {expr}"
        for name, matchers in selectors:
            assert name in exported, f"{title}: {name} is not exported by gateway/metrics.py"
            labels |= exported[name]
            for label, op, value in _MATCHER.findall(matchers):
                assert label in exported[name] | TARGET_LABELS, f"{title}: {name} has no {label}"
                if label in bounded and "$" not in value:
                    what = f"{title}: {label}{op}{value!r}, the gateway sets {bounded[label]}"
                    assert op in {"=", "!="}, what
                    assert value in bounded[label], what
        for group in _GROUPING.findall(expr):
            for label in filter(None, (g.strip() for g in group.split(","))):
                assert label in labels, f"{title}: groups by {label!r}, which is not a label"
        for label in re.findall(r"label_values\([^,]+,\s*([a-z_]+)\)", expr):
            assert label in labels, f"{title}: no label {label}"


def test_dashboard_panels_cover_the_gateway() -> None:
    dash = _dashboard()
    exprs = [e for _, e in _expressions(dash)]
    used = {name for e in exprs for name, _ in _SELECTOR.findall(e)}
    families = {
        f.name
        for f in text_string_to_metric_families(_render_metrics())
        if not f.name.endswith("_created")
    }
    unused = {f for f in families if not any(u == f or u.startswith(f + "_") for u in used)}
    assert not unused, f"exported but on no panel: {unused}"

    def quantiles(metric: str, by: str) -> set[str]:
        pattern = rf"histogram_quantile\((0\.\d+), sum by \({by}\) \(rate\({metric}_bucket"
        return {m for e in exprs for m in re.findall(pattern, e)}

    for metric in ("retort_time_to_first_token_seconds", "retort_request_duration_seconds"):
        assert {"0.5", "0.95"} <= quantiles(metric, "le, adapter"), f"{metric} per adapter"
        # Students are models named after themselves: per (model, adapter) compares a student
        # with its teacher (base model + adapter).
        assert {"0.5", "0.95"} <= quantiles(metric, "le, model, adapter"), f"{metric} per model"
    titles = " ".join(p["title"].lower() for p in dash["panels"])
    assert "students vs teachers" in titles
    assert any("retort_completion_tokens_total" in e for e in exprs)
    assert any("retort_cost_usd_total" in e for e in exprs)
    assert any("retort_promptlog_dropped_total" in e and "reason" in e for e in exprs)


def test_hpa_scales_on_an_exported_metric(render_set: Any) -> None:
    (hpa,) = render_set("production").of_kind("HorizontalPodAutoscaler")
    pods = [m["pods"]["metric"]["name"] for m in hpa["spec"]["metrics"] if m["type"] == "Pods"]
    assert pods
    for name in pods:
        assert name in _exported(), f"the HPA reads {name}, which the gateway does not export"

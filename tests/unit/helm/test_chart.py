"""The chart, rendered and linted with real Helm, and every manifest checked against the
Kubernetes OpenAPI schemas (kubernetes-validate, strict: unknown fields are errors)."""

from __future__ import annotations

import hashlib
import json
import re
from typing import Any

import helm_python as helm
import kubernetes_validate
import msgspec
import pytest
import yaml

from gateway.settings import Settings

from ._chart import CHART, NAMESPACE, RELEASE, VALUE_SETS, Rendered, render

KUBE_VERSION = "1.34.0"
# Custom resources kubernetes-validate has no schema for; their fields are asserted by hand.
CRDS = {"ServiceMonitor"}
GPU = "nvidia.com/gpu"
METRICS = {
    "retort_requests_total",
    "retort_request_duration_seconds",
    "retort_time_to_first_token_seconds",
    "retort_time_per_output_token_seconds",
    "retort_prompt_tokens_total",
    "retort_completion_tokens_total",
    "retort_cost_usd_total",
    "retort_inflight_requests",
    "retort_adapter_load_seconds",
    "retort_adapters_loaded",
    "retort_promptlog_queue_depth",
    "retort_promptlog_written_total",
    "retort_promptlog_dropped_total",
    "retort_promptlog_degraded",
    "retort_promptlog_spooled_total",
    "retort_promptlog_spool_bytes",
    "retort_limits_degraded",
    "retort_engine_running_requests",
    "retort_engine_waiting_requests",
    "retort_engine_kv_cache_usage_ratio",
    "retort_shadow_requests_total",
    "retort_shadow_agreement_ratio",
    "retort_shadow_student_latency_seconds",
    "retort_structured_output_failures_total",
    "retort_endpoint_requests_total",
    "retort_engine_start_seconds",
    "retort_rollout_stage",
    "retort_rollout_split_ratio",
    "retort_rollout_agreement_ratio",
    "retort_rollout_projected_saving_ratio",
    "retort_rollout_decisions_total",
    "retort_admission_rejected_total",
    "retort_admission_waiting_sequences",
    "retort_stream_stalls_total",
}


def _containers(r: Rendered) -> list[dict[str, Any]]:
    out = list(r.pod_spec["containers"])
    for cj in r.of_kind("CronJob"):
        out.extend(cj["spec"]["jobTemplate"]["spec"]["template"]["spec"]["containers"])
    return out


def _drain_seconds(r: Rendered) -> int:
    return int(r.retort_yaml["shutdown"]["drain_seconds"])


# --- Helm itself -------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(VALUE_SETS))
def test_helm_lint_is_clean(name: str) -> None:
    report = helm.lint(CHART, VALUE_SETS[name], strict=True, kube_version=f"v{KUBE_VERSION}")
    problems = [m for m in report["messages"] if m["severity"] >= 2]
    assert report["errors"] == [], report
    assert problems == [], problems


def test_chart_metadata() -> None:
    with helm.Chart.load(CHART) as chart:
        meta = chart.metadata
        assert chart.schema is not None
    assert meta["apiVersion"] == "v2"
    assert meta["name"] == "retort"


# --- Kubernetes schemas --------------------------------------------------------------------


def test_every_manifest_validates(rendered: Rendered) -> None:
    skipped = set()
    for doc in rendered.docs:
        assert doc["metadata"]["name"], doc
        try:
            kubernetes_validate.validate(doc, KUBE_VERSION, strict=True)
        except kubernetes_validate.SchemaNotFoundError:
            skipped.add(doc["kind"])
        except kubernetes_validate.ValidationError as exc:
            where = ".".join(str(p) for p in exc.path)
            pytest.fail(f"{doc['kind']}/{doc['metadata']['name']}: {where}: {exc.message}")
    assert skipped <= CRDS, f"no schema for {skipped - CRDS}"


def test_resource_names_are_unique(rendered: Rendered) -> None:
    keys = [(d["kind"], d["metadata"]["name"]) for d in rendered.docs]
    assert len(keys) == len(set(keys))


def test_which_objects_each_value_set_renders(render_set: Any) -> None:
    always = {"Deployment", "Service", "ConfigMap", "PersistentVolumeClaim"}
    always |= {"PodDisruptionBudget", "ServiceAccount"}
    optional = {"Ingress", "HorizontalPodAutoscaler", "ServiceMonitor", "CronJob", "Secret"}
    default = render_set("default").kinds()
    assert default >= always
    assert not default & optional
    assert render_set("production").kinds() >= always | optional - {"Secret"}
    assert "Secret" not in render_set("production").kinds()  # existingSecret
    assert render_set("cpu").kinds() >= always | {"Secret", "CronJob"}
    assert len(render_set("production").of_kind("CronJob")) == 2


# --- The gateway Deployment ------------------------------------------------------------------


def test_probes_hit_the_gateway_endpoints(rendered: Rendered) -> None:
    c = rendered.container
    port = c["ports"][0]
    assert port == {"name": "http", "containerPort": 8000, "protocol": "TCP"}
    assert c["startupProbe"]["httpGet"] == {"path": "/ready", "port": "http"}
    assert c["readinessProbe"]["httpGet"] == {"path": "/ready", "port": "http"}
    assert c["livenessProbe"]["httpGet"] == {"path": "/health", "port": "http"}
    startup = c["startupProbe"]
    # Long enough for a model load: at least ten minutes before the kubelet gives up.
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 600


def test_serves_the_mounted_config(rendered: Rendered) -> None:
    c = rendered.container
    assert c["args"] == [
        "serve",
        "--config",
        "/etc/retort/retort.yaml",
        "--host",
        "0.0.0.0",
        "--port",
        "8000",
    ]
    mounts = {m["name"]: m for m in c["volumeMounts"]}
    assert mounts["config"]["mountPath"] == "/etc/retort"
    assert mounts["config"]["readOnly"] is True
    volumes = {v["name"]: v for v in rendered.pod_spec["volumes"]}
    assert volumes["config"]["configMap"]["name"] == f"{RELEASE}-retort"
    env = {e["name"]: e.get("value") for e in c["env"]}
    assert env["RETORT_HOME"] == mounts["state"]["mountPath"] == "/var/lib/retort"


def test_state_volume_is_the_claim(rendered: Rendered) -> None:
    volumes = {v["name"]: v for v in rendered.pod_spec["volumes"]}
    claim = volumes["state"]["persistentVolumeClaim"]["claimName"]
    (pvc,) = rendered.of_kind("PersistentVolumeClaim")
    assert pvc["metadata"]["name"] == claim
    assert pvc["metadata"]["annotations"]["helm.sh/resource-policy"] == "keep"


def test_existing_claim_is_used_and_not_created() -> None:
    r = render({"persistence": {"existingClaim": "models-rwx"}})
    assert not r.of_kind("PersistentVolumeClaim")
    volumes = {v["name"]: v for v in r.pod_spec["volumes"]}
    assert volumes["state"]["persistentVolumeClaim"]["claimName"] == "models-rwx"


@pytest.mark.parametrize("name", ["default", "cpu"])
def test_cpu_profile_requests_cpu_and_memory_and_no_gpu(render_set: Any, name: str) -> None:
    r = render_set(name)
    for c in _containers(r):
        res = c["resources"]
        assert {"cpu", "memory"} <= set(res["requests"]), c["name"]
        assert GPU not in res.get("limits", {}), c["name"]
        assert GPU not in res.get("requests", {}), c["name"]
        assert not c["image"].endswith("-cuda")
    assert "tolerations" not in r.pod_spec
    if name == "cpu":
        assert r.container["resources"]["requests"]["cpu"] == "6"


@pytest.mark.parametrize("name", ["gpu", "production"])
def test_gpu_profile_requests_gpus(render_set: Any, name: str) -> None:
    r = render_set(name)
    res = r.container["resources"]
    expected = VALUE_SETS[name].get("gpu", {}).get("count", 1)
    assert res["limits"][GPU] == expected
    assert {"cpu", "memory"} <= set(res["requests"])
    assert r.container["image"].endswith("-cuda")
    tolerations = r.pod_spec["tolerations"]
    assert {"key": GPU, "operator": "Exists", "effect": "NoSchedule"} in tolerations
    for cj in r.of_kind("CronJob"):
        pod = cj["spec"]["jobTemplate"]["spec"]["template"]["spec"]
        assert pod["containers"][0]["resources"]["limits"][GPU] == 1
        assert pod["tolerations"] == tolerations


def test_gpu_node_selector_only_in_gpu_profile(render_set: Any) -> None:
    sel = render_set("gpu").pod_spec["nodeSelector"]
    assert sel == {"nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3"}
    cpu = render({**VALUE_SETS["gpu"], "profile": "cpu"})
    assert "nodeSelector" not in cpu.pod_spec
    assert GPU not in cpu.container["resources"]["limits"]


def test_too_few_gpus_for_tensor_parallel_fails() -> None:
    values = {
        "profile": "gpu",
        "gpu": {"count": 1},
        "config": {"engine": {"tensor_parallel_size": 4}},
    }
    with pytest.raises(helm.HelmError, match=r"gpu\.count"):
        render(values)


def test_grace_period_outlasts_prestop_and_drain(rendered: Rendered) -> None:
    spec = rendered.pod_spec
    pre_stop = rendered.container["lifecycle"]["preStop"]["exec"]["command"]
    assert pre_stop[0] == "sleep"
    sleep = int(pre_stop[1])
    assert 1 <= sleep < 30
    assert spec["terminationGracePeriodSeconds"] > sleep + _drain_seconds(rendered)


def test_drain_seconds_drive_the_grace_period(render_set: Any) -> None:
    assert _drain_seconds(render_set("cpu")) == 45
    assert _drain_seconds(render_set("production")) == 120
    assert render_set("production").pod_spec["terminationGracePeriodSeconds"] > 125


def test_explicit_grace_period_shorter_than_drain_fails() -> None:
    with pytest.raises(helm.HelmError, match="terminationGracePeriodSeconds"):
        render({"terminationGracePeriodSeconds": 20})
    ok = render({"terminationGracePeriodSeconds": 90})
    assert ok.pod_spec["terminationGracePeriodSeconds"] == 90


def test_runs_as_non_root_with_read_only_root(rendered: Rendered) -> None:
    pods = [rendered.pod_spec]
    pods += [
        cj["spec"]["jobTemplate"]["spec"]["template"]["spec"] for cj in rendered.of_kind("CronJob")
    ]
    for pod in pods:
        psc = pod["securityContext"]
        assert psc["runAsNonRoot"] is True
        assert psc["runAsUser"] != 0
        assert psc["seccompProfile"] == {"type": "RuntimeDefault"}
        assert pod["automountServiceAccountToken"] is False
        (c,) = pod["containers"]
        sc = c["securityContext"]
        assert sc["runAsNonRoot"] is True
        assert sc["allowPrivilegeEscalation"] is False
        assert sc["readOnlyRootFilesystem"] is True
        assert sc["capabilities"]["drop"] == ["ALL"]
        # With a read-only root, everything written must land on a volume.
        mounts = {m["mountPath"]: m["name"] for m in c["volumeMounts"]}
        volumes = {v["name"]: v for v in pod["volumes"]}
        assert "emptyDir" in volumes[mounts["/tmp"]]
        assert volumes[mounts["/dev/shm"]]["emptyDir"]["medium"] == "Memory"
        env = {e["name"]: e.get("value") for e in c["env"]}
        assert env["HOME"].startswith("/tmp")


def test_config_checksum_rolls_the_pods() -> None:
    base = render()
    changed = render({"config": {"server": {"log_level": "debug"}}})
    key = "checksum/config"
    a = base.deployment["spec"]["template"]["metadata"]["annotations"][key]
    b = changed.deployment["spec"]["template"]["metadata"]["annotations"][key]
    assert re.fullmatch(r"[0-9a-f]{64}", a)
    assert a != b
    cm = next(v for k, v in base.files.items() if k.endswith("/configmap.yaml"))
    assert a == hashlib.sha256(cm.encode()).hexdigest()


def test_secret_checksum_rolls_the_pods() -> None:
    one = render({"secrets": {"databaseUrl": "postgresql+asyncpg://a@db/x"}})
    two = render({"secrets": {"databaseUrl": "postgresql+asyncpg://b@db/x"}})
    key = "checksum/secret"
    a = one.deployment["spec"]["template"]["metadata"]["annotations"][key]
    assert a != two.deployment["spec"]["template"]["metadata"]["annotations"][key]


def test_replicas_left_to_the_hpa(render_set: Any) -> None:
    assert render_set("default").deployment["spec"]["replicas"] == 1
    prod = render_set("production")
    assert "replicas" not in prod.deployment["spec"]
    hpa = prod.one("HorizontalPodAutoscaler")
    assert hpa["spec"]["scaleTargetRef"] == {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "name": prod.deployment["metadata"]["name"],
    }
    assert (hpa["spec"]["minReplicas"], hpa["spec"]["maxReplicas"]) == (2, 6)
    (metric,) = hpa["spec"]["metrics"]
    assert metric["pods"]["metric"]["name"] == "retort_inflight_requests"
    assert metric["pods"]["target"] == {"type": "AverageValue", "averageValue": "24"}


def test_selectors_pick_only_gateway_pods(rendered: Rendered) -> None:
    pod_labels = rendered.deployment["spec"]["template"]["metadata"]["labels"]
    selector = rendered.deployment["spec"]["selector"]["matchLabels"]
    assert selector.items() <= pod_labels.items()
    svc = rendered.one("Service")
    assert svc["spec"]["selector"] == selector
    assert svc["spec"]["ports"][0]["targetPort"] == "http"
    assert rendered.one("PodDisruptionBudget")["spec"]["selector"]["matchLabels"] == selector
    for cj in rendered.of_kind("CronJob"):
        job_labels = cj["spec"]["jobTemplate"]["spec"]["template"]["metadata"]["labels"]
        assert not selector.items() <= job_labels.items(), "the Service would route to a job"


def test_pdb_takes_one_of_min_or_max(render_set: Any) -> None:
    assert render_set("default").one("PodDisruptionBudget")["spec"]["maxUnavailable"] == 1
    prod = render_set("production").one("PodDisruptionBudget")["spec"]
    assert prod["minAvailable"] == 1
    assert "maxUnavailable" not in prod
    # 0 is a real setting (no voluntary evictions), not "unset".
    zero = render({"podDisruptionBudget": {"maxUnavailable": 0}})
    assert zero.one("PodDisruptionBudget")["spec"]["maxUnavailable"] == 0
    with pytest.raises(helm.HelmError, match="not both"):
        render({"podDisruptionBudget": {"minAvailable": 1, "maxUnavailable": 1}})


def test_ingress_routes_to_the_service(render_set: Any) -> None:
    prod = render_set("production")
    ing = prod.one("Ingress")
    svc = prod.one("Service")
    assert ing["spec"]["ingressClassName"] == "nginx"
    assert ing["spec"]["tls"] == [{"hosts": ["llm.example.com"], "secretName": "llm-tls"}]
    (rule,) = ing["spec"]["rules"]
    assert rule["host"] == "llm.example.com"
    backend = rule["http"]["paths"][0]["backend"]["service"]
    assert backend == {
        "name": svc["metadata"]["name"],
        "port": {"number": svc["spec"]["ports"][0]["port"]},
    }


def test_service_monitor_scrapes_metrics(render_set: Any) -> None:
    prod = render_set("production")
    sm = prod.one("ServiceMonitor")
    assert sm["apiVersion"] == "monitoring.coreos.com/v1"
    assert sm["metadata"]["namespace"] == NAMESPACE
    assert sm["metadata"]["labels"]["release"] == "kube-prometheus"
    svc = prod.one("Service")
    assert sm["spec"]["selector"]["matchLabels"].items() <= svc["metadata"]["labels"].items()
    assert sm["spec"]["namespaceSelector"] == {"matchNames": [NAMESPACE]}
    (endpoint,) = sm["spec"]["endpoints"]
    assert endpoint["port"] == svc["spec"]["ports"][0]["name"] == "http"
    assert endpoint["path"] == "/metrics"
    assert re.fullmatch(r"\d+s", endpoint["interval"])


# --- Config and secrets --------------------------------------------------------------------


def test_retort_yaml_matches_the_gateway_settings(rendered: Rendered) -> None:
    cfg = rendered.retort_yaml
    assert cfg["server"]["host"] == "0.0.0.0"
    assert cfg["server"]["port"] == rendered.container["ports"][0]["containerPort"]
    known = {f.name for f in msgspec.structs.fields(Settings)}
    assert set(cfg) <= known, f"unknown sections {set(cfg) - known}"
    # It converts exactly as the gateway converts it (forbid_unknown_fields: a misspelled
    # engine argument fails here). test_gateway_contract.py adds the environment.
    settings = msgspec.convert(cfg, Settings)
    model = VALUE_SETS[rendered.name].get("config", {}).get("model", {}).get("path", "default")
    assert settings.model.path == model
    assert settings.engine.kind == "vllm"
    assert all(isinstance(v, dict) and v for v in cfg.values()), "empty sections are left out"


def test_config_values_reach_retort_yaml(render_set: Any) -> None:
    gpu = render_set("gpu").retort_yaml
    assert gpu["engine"]["tensor_parallel_size"] == 2
    assert gpu["engine"]["max_model_len"] == 8192
    assert gpu["model"]["served_name"] == "qwen-7b"
    assert "served_name" not in render_set("default").retort_yaml["model"]
    prod = render_set("production").retort_yaml
    assert prod["promptlog"] == {"sample_rate": 0.5, "retention_days": 30}
    assert prod["pricing"]["prices"]["*"]["completion_per_1m"] == 0.6
    assert prod["students"]["traffic"]["support-bot"] == {
        "student": "support-bot-student",
        "share": 0.2,
    }
    assert "promptlog" not in render_set("default").retort_yaml
    # Large integers stay integers (Helm handles numbers as float64).
    assert render_set("default").retort_yaml["server"]["max_body_bytes"] == 4194304


def test_chart_secret_holds_database_url_and_key_hashes(render_set: Any) -> None:
    cpu = render_set("cpu")
    env = cpu.secret_env()
    assert env["RETORT_PROMPTLOG__URL"] == VALUE_SETS["cpu"]["secrets"]["databaseUrl"]
    assert json.loads(env["RETORT_AUTH__API_KEYS"]) == VALUE_SETS["cpu"]["secrets"]["apiKeys"]
    (secret,) = cpu.of_kind("Secret")
    for c in _containers(cpu):
        assert {"secretRef": {"name": secret["metadata"]["name"]}} in c["envFrom"]
    # Nothing secret leaks into the ConfigMap.
    assert "s3cret" not in json.dumps(cpu.retort_yaml)


def test_existing_secret_is_referenced_not_created(render_set: Any) -> None:
    prod = render_set("production")
    assert not prod.of_kind("Secret")
    for c in _containers(prod):
        assert c["envFrom"] == [{"secretRef": {"name": "retort-prod-secrets"}}]
    assert "checksum/secret" not in prod.deployment["spec"]["template"]["metadata"]["annotations"]
    with pytest.raises(helm.HelmError, match="existingSecret"):
        render({"secrets": {"existingSecret": "x", "databaseUrl": "postgresql://a@b/c"}})


def test_no_secret_without_secret_values(render_set: Any) -> None:
    default = render_set("default")
    assert not default.of_kind("Secret")
    assert "envFrom" not in default.container


# --- Distillation --------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["gpu", "cpu", "production"])
def test_distill_cronjob(render_set: Any, name: str) -> None:
    r = render_set(name)
    jobs = VALUE_SETS[name]["distill"]["jobs"]
    cronjobs = r.of_kind("CronJob")
    assert len(cronjobs) == len(jobs)
    for cj in cronjobs:
        spec = cj["spec"]
        assert spec["concurrencyPolicy"] == "Forbid"
        pod = spec["jobTemplate"]["spec"]["template"]["spec"]
        assert pod["restartPolicy"] == "Never"
        (c,) = pod["containers"]
        assert c["image"] == r.container["image"], "the same image as the gateway"
        args = c["args"]
        assert args[:4] == ["distill", "run", "--config", "/etc/retort/distill.yaml"]
        adapter = args[args.index("--adapter") + 1]
        job = next(j for j in jobs if j["adapter"] == adapter)
        default_schedule = VALUE_SETS[name]["distill"].get("schedule", "0 3 * * *")
        assert spec["schedule"] == job.get("schedule", default_schedule)
        assert cj["metadata"]["name"] == f"{RELEASE}-retort-distill-{job['name']}"
        out = args[args.index("--out") + 1]
        assert out.startswith("/var/lib/retort/runs/")
        assert "--publish" in args
        for extra in job.get("extraArgs", []):
            assert extra in args
        volumes = {v["name"]: v for v in pod["volumes"]}
        gateway_volumes = {v["name"]: v for v in r.pod_spec["volumes"]}
        assert volumes["config"] == gateway_volumes["config"], "the same config"
        assert volumes["state"] == gateway_volumes["state"], "the same state volume"
        env = {e["name"] for e in c["env"]}
        assert "DISTILL_RUN_ID" in env
        assert "$(DISTILL_RUN_ID)" in out


def test_duplicate_key_ids_fail() -> None:
    key = {"id": "app", "sha256": "ab" * 32}
    with pytest.raises(helm.HelmError, match="used twice"):
        render({"secrets": {"apiKeys": [key, {**key, "sha256": "cd" * 32}]}})


def test_distill_config_is_rendered_only_with_distillation(render_set: Any) -> None:
    cm = render_set("default").one("ConfigMap", f"{RELEASE}-retort")
    assert "distill.yaml" not in cm["data"]
    cm = render_set("cpu").one("ConfigMap", f"{RELEASE}-retort")
    assert yaml.safe_load(cm["data"]["distill.yaml"]) == {
        **VALUE_SETS["cpu"]["distill"]["config"],
        "settings": "/etc/retort/retort.yaml",
    }


def test_distill_enabled_without_jobs_fails() -> None:
    with pytest.raises(helm.HelmError, match=r"distill\.jobs"):
        render({"distill": {"enabled": True}})


def test_distill_profile_can_differ_from_the_gateway() -> None:
    r = render({**VALUE_SETS["gpu"], "distill": {**VALUE_SETS["gpu"]["distill"], "profile": "cpu"}})
    (cj,) = r.of_kind("CronJob")
    c = cj["spec"]["jobTemplate"]["spec"]["template"]["spec"]["containers"][0]
    assert GPU not in c["resources"].get("limits", {})
    assert GPU in r.container["resources"]["limits"]


# --- Grafana dashboard ---------------------------------------------------------------------


def test_grafana_dashboard(render_set: Any) -> None:
    cm = render_set("default").one("ConfigMap", "-dashboard")
    assert cm["metadata"]["labels"]["grafana_dashboard"] == "1"
    dash = json.loads(cm["data"]["retort.json"])
    assert dash["uid"] == "retort-gateway"
    assert dash["title"]
    targets = [(p["title"], t["expr"]) for p in dash["panels"] for t in p.get("targets", [])]
    assert targets
    used: set[str] = set()
    for title, expr in targets:
        names = set(re.findall(r"\b(retort_[a-z_]+?)(?:_bucket|_sum|_count)?\b", expr))
        assert names, f"panel {title!r} reads no retort_ metric: {expr}"
        assert expr.count("(") == expr.count(")"), expr
        used |= names
    assert used == METRICS, f"missing {METRICS - used}, unknown {used - METRICS}"
    exprs = [e for _, e in targets]

    def quantile_by_adapter(metric: str) -> bool:
        pattern = rf"histogram_quantile\(0\.\d+, sum by \(le, adapter\) \(rate\({metric}_bucket"
        return any(re.search(pattern, e) for e in exprs)

    assert quantile_by_adapter("retort_time_to_first_token_seconds")
    assert quantile_by_adapter("retort_request_duration_seconds")
    assert any("retort_promptlog_dropped_total" in e for e in exprs)
    assert any("retort_cost_usd_total" in e and "adapter" in e for e in exprs)
    assert {v["name"] for v in dash["templating"]["list"]} >= {"datasource", "adapter"}


def test_dashboard_can_be_turned_off() -> None:
    r = render({"grafana": {"dashboard": {"enabled": False}}})
    assert [cm["metadata"]["name"] for cm in r.of_kind("ConfigMap")] == [f"{RELEASE}-retort"]


def test_notes_explain_how_to_reach_the_api(render_set: Any) -> None:
    assert "port-forward svc/demo-retort" in render_set("default").notes
    prod = render_set("production").notes
    assert "https://llm.example.com/v1" in prod
    assert "demo-retort-distill-support" in prod


# --- values.schema.json --------------------------------------------------------------------


@pytest.mark.parametrize(
    "bad",
    [
        {"replicaCount": "two"},
        {"replicas": 2},  # typo of a main key
        {"profile": "tpu"},
        {"image": {"repo": "x"}},
        {"config": {"engin": {}}},
        {"config": {"engine": {"tensor_paralel_size": 2}}},
        {"config": {"engine": {"gpu_memory_utilization": 1.5}}},
        {"service": {"port": 0}},
        {"persistence": {"accessModes": ["ReadWriteSometimes"]}},
        {"distill": {"jobs": [{"name": "Bad_Name", "adapter": "a"}]}},
        {"secrets": {"redisUrl": "localhost:6379"}},
        # API keys are objects {id, sha256, admin?, rpm?, tpm?, max_concurrent?}.
        {
            "secrets": {
                "apiKeys": ["9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08"]
            }
        },
        {"secrets": {"apiKeys": [{"id": "a", "sha256": "not-a-digest"}]}},
        {"secrets": {"apiKeys": [{"id": "a", "sha256": "ab" * 32, "role": "admin"}]}},
        {"secrets": {"adminKeys": ["ab" * 32]}},
        # Every config section takes only the gateway's own fields.
        {"config": {"pricing": {"default": {"prompt_per_1m": 1}}}},
        {"config": {"auth": {"admin_keys": []}}},
        {"config": {"promptlog": {"sample_rate": 2}}},
        {"config": {"students": {"traffic": {"bot": {"share": 0.5}}}}},
        {"config": {"students": {"traffic": {"bot": {"student": "s", "share": 1.5}}}}},
        {"config": {"metrics": {"key_labels": True}}},
        {"distill": {"config": {"settings": "/elsewhere.yaml"}}},
    ],
    ids=lambda v: json.dumps(v, separators=(",", ":")),
)
def test_schema_rejects_bad_values(bad: dict[str, Any]) -> None:
    with pytest.raises(helm.HelmValuesError):
        render(bad)
    report = helm.lint(CHART, bad, kube_version=f"v{KUBE_VERSION}")
    assert [m for m in report["messages"] if m["severity"] == 3], report


def test_schema_accepts_every_value_set() -> None:
    with helm.Chart.load(CHART) as chart:
        for values in VALUE_SETS.values():
            chart.validate_schema(chart.merge_values(values))

"""Render ``helm/retort`` with real Helm (helm-python-sdk wraps Helm's Go SDK) per value set."""

from __future__ import annotations

import base64
import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import helm_python as helm
import yaml

ROOT = Path(__file__).resolve().parents[3]
CHART = ROOT / "helm" / "retort"
RELEASE = "demo"
NAMESPACE = "ml"

# Plain-text API keys of the value sets, by id; the values hold only their sha256.
TEST_KEYS = {
    "app": "sk-retort-test-app",
    "ops": "sk-retort-test-ops",
    "web": "sk-retort-test-web",
    "admin": "sk-retort-test-admin",
}


def _sha(key_id: str) -> str:
    return hashlib.sha256(TEST_KEYS[key_id].encode()).hexdigest()


# Value sets the chart must render, lint and validate cleanly. `production` is what an ops team
# would run: GPUs, ingress, autoscaling, a ServiceMonitor, keys and Postgres URL in their own
# Secret, prompt-log settings and a nightly distillation job.
VALUE_SETS: dict[str, dict[str, Any]] = {
    "default": {},
    "gpu": {
        "profile": "gpu",
        "gpu": {"count": 2, "nodeSelector": {"nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3"}},
        "config": {
            "model": {"path": "Qwen/Qwen2.5-7B-Instruct", "served_name": "qwen-7b"},
            "engine": {"tensor_parallel_size": 2, "max_model_len": 8192},
        },
        "distill": {"enabled": True, "jobs": [{"name": "support", "adapter": "support-bot"}]},
    },
    "cpu": {
        "profile": "cpu",
        "resources": {"cpu": {"requests": {"cpu": "6", "memory": "12Gi"}}},
        "config": {"engine": {"cpu_kv_cache_space_gb": 4}, "shutdown": {"drain_seconds": 45}},
        "secrets": {
            "databaseUrl": "postgresql+asyncpg://retort:s3cret@pg.db.svc:5432/retort",
            "apiKeys": [
                {
                    "id": "app",
                    "sha256": _sha("app"),
                    "rpm": 600,
                    "max_concurrent": 8,
                },
                {"id": "ops", "sha256": _sha("ops"), "admin": True},
            ],
        },
        "distill": {
            "enabled": True,
            "schedule": "30 1 * * *",
            "config": {"dataset": {"since": "7d"}, "train": {"max_steps": 50}},
            "jobs": [{"name": "faq", "adapter": "faq", "extraArgs": ["--precision", "int8"]}],
        },
    },
    "production": {
        "profile": "gpu",
        "image": {"repository": "registry.example.com/ml/retort", "tag": "1.4.2-cuda"},
        "config": {
            "model": {"path": "/var/lib/retort/models/llama-3.1-8b-instruct"},
            "engine": {"max_model_len": 16384, "max_loras": 8},
            "promptlog": {"sample_rate": 0.5, "retention_days": 30},
            "shutdown": {"drain_seconds": 120},
            "pricing": {"prices": {"*": {"prompt_per_1m": 0.15, "completion_per_1m": 0.6}}},
            "limits": {"default_rpm": 1200, "default_max_concurrent": 32},
            "metrics": {"key_label": True},
            "students": {
                "autoload": False,
                "traffic": {"support-bot": {"student": "support-bot-student", "share": 0.2}},
            },
        },
        "secrets": {"existingSecret": "retort-prod-secrets"},
        "ingress": {
            "enabled": True,
            "className": "nginx",
            "annotations": {"nginx.ingress.kubernetes.io/proxy-buffering": "off"},
            "hosts": [{"host": "llm.example.com", "paths": [{"path": "/", "pathType": "Prefix"}]}],
            "tls": [{"hosts": ["llm.example.com"], "secretName": "llm-tls"}],
        },
        "autoscaling": {
            "enabled": True,
            "minReplicas": 2,
            "maxReplicas": 6,
            "targetInflightRequests": 24,
            "targetCPUUtilizationPercentage": None,
        },
        "podDisruptionBudget": {"maxUnavailable": None, "minAvailable": 1},
        "persistence": {"accessModes": ["ReadWriteMany"], "storageClass": "efs", "size": "200Gi"},
        "metrics": {"serviceMonitor": {"enabled": True, "labels": {"release": "kube-prometheus"}}},
        "distill": {
            "enabled": True,
            "jobs": [
                {"name": "support", "adapter": "support-bot", "schedule": "0 2 * * *"},
                {"name": "sql", "adapter": "text-to-sql"},
            ],
        },
    },
}

# What an operator puts in `secrets.existingSecret`, as values.yaml tells them to: RETORT_*
# variables, the keys as a JSON or YAML list of key objects.
EXISTING_SECRETS: dict[str, dict[str, str]] = {
    "retort-prod-secrets": {
        "RETORT_PROMPTLOG__URL": "postgresql+asyncpg://retort:pw@pg.prod.svc:5432/retort",
        "RETORT_AUTH__API_KEYS": (
            f"- id: web\n  sha256: {_sha('web')}\n  tpm: 200000\n"
            f'- {{id: admin, sha256: "{_sha("admin")}", admin: true}}\n'
        ),
        "RETORT_LIMITS__REDIS_URL": "redis://redis.prod.svc:6379/0",
    }
}


@dataclass
class Rendered:
    """One render of the chart: the manifests as dicts, and NOTES.txt."""

    name: str
    values: dict[str, Any]
    docs: list[dict[str, Any]]
    notes: str
    files: dict[str, str] = field(repr=False)

    def of_kind(self, kind: str) -> list[dict[str, Any]]:
        return [d for d in self.docs if d["kind"] == kind]

    def one(self, kind: str, name_suffix: str = "") -> dict[str, Any]:
        found = [d for d in self.of_kind(kind) if d["metadata"]["name"].endswith(name_suffix)]
        assert len(found) == 1, f"expected one {kind} *{name_suffix}, got {len(found)}"
        return found[0]

    def kinds(self) -> set[str]:
        return {d["kind"] for d in self.docs}

    @property
    def deployment(self) -> dict[str, Any]:
        return self.one("Deployment")

    @property
    def pod_spec(self) -> dict[str, Any]:
        spec: dict[str, Any] = self.deployment["spec"]["template"]["spec"]
        return spec

    @property
    def container(self) -> dict[str, Any]:
        (c,) = self.pod_spec["containers"]
        return c

    @property
    def retort_yaml(self) -> dict[str, Any]:
        cm = self.one("ConfigMap", f"{RELEASE}-retort")
        cfg: dict[str, Any] = yaml.safe_load(cm["data"]["retort.yaml"])
        return cfg

    def secret_env(self) -> dict[str, str]:
        (secret,) = self.of_kind("Secret")
        return {k: base64.b64decode(v).decode() for k, v in secret["data"].items()}


def render(values: dict[str, Any] | None = None, name: str = "custom") -> Rendered:
    with helm.Chart.load(CHART) as chart:
        files = chart.render(values, name=RELEASE, namespace=NAMESPACE)
    docs: list[dict[str, Any]] = []
    notes = ""
    for path, text in sorted(files.items()):
        if path.endswith("NOTES.txt"):
            notes = text
            continue
        docs.extend(d for d in yaml.safe_load_all(text) if d)
    return Rendered(name=name, values=values or {}, docs=docs, notes=notes, files=files)

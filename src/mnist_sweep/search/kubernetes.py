"""Kubernetes manifests for a sweep (`python -m mnist_sweep.sweep --kubernetes ...`, `make
k8s-manifest`): a Job that creates the study and its parent run (`--create-only`), then an
Indexed Job of workers that join it (`--join`), one GPU per pod, as optuna-examples' kubernetes
example does. The image is docker/Dockerfile's; the PostgreSQL password comes from a Secret
mounted as a file (PGPASSWORD_FILE, read by the image's entrypoint), never from the manifest.
Rendered and checked by tests/test_kubernetes.py; not run against a cluster here.
"""

from __future__ import annotations

import json
import re
import urllib.parse
from pathlib import Path
from typing import Any

from mnist_sweep.base.errors import ConfigError
from mnist_sweep.base.urls import SECRET_QUERY_KEYS, mask_secrets, redact_uri, scheme_of

KUBERNETES_DEFAULTS: dict[str, Any] = {
    "image": "mnist-sweep:latest",  # built from docker/Dockerfile, pushed to the cluster's registry
    "workers": 4,  # pods of the Indexed Job, one worker each
    "gpus_per_pod": 1,  # nvidia.com/gpu; 0: CPU pods
    "cpu": "2",
    "memory": "8Gi",
    "secret": "mnist-sweep-pg",  # a Secret with key `password`: the PostgreSQL password
    "namespace": None,
    "data_claim": None,  # a PersistentVolumeClaim holding the data (mounted at data.root)
}
SECRET_DIR = "/run/secrets/mnist-sweep"
PASSED_ON_NOT = ("sweep.storage", "tracking.tracking_uri", "sweep.launcher", "sweep.kubernetes")


def check_kubernetes_settings(k8s: Any) -> None:
    if not isinstance(k8s, dict) or set(k8s) - set(KUBERNETES_DEFAULTS):
        unknown = (
            sorted(map(str, set(k8s) - set(KUBERNETES_DEFAULTS))) if isinstance(k8s, dict) else []
        )
        raise ConfigError(
            f"sweep.kubernetes={k8s!r} is not allowed"
            + (f" (unknown: {', '.join(unknown)})" if unknown else "")
            + f": a mapping of {', '.join(KUBERNETES_DEFAULTS)}."
        )
    for key in ("workers", "gpus_per_pod"):
        value, low = k8s[key], 1 if key == "workers" else 0
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise ConfigError(
                f"sweep.kubernetes.{key}={value!r} is not allowed: an integer >= {low}."
            )
    for key in ("secret", "namespace", "data_claim"):
        value = k8s[key]
        if value is not None and not re.fullmatch(r"[a-z0-9]([-a-z0-9.]*[a-z0-9])?", str(value)):
            raise ConfigError(
                f"sweep.kubernetes.{key}={value!r} is not allowed: a Kubernetes name "
                "(lower-case letters, digits, '-' and '.')"
                + (" or null." if key != "secret" else ".")
            )


def _without_password(url: str) -> str:
    """The URL with no password in it, neither user:password@ nor a secret query value."""
    parts = urllib.parse.urlsplit(url)
    netloc = parts.netloc.rsplit("@", 1)
    if len(netloc) == 2:  # keep the host as written (an IPv6 address keeps its brackets)
        netloc = [netloc[0].split(":", 1)[0], netloc[1]]
    query = [
        (k, v)
        for k, v in urllib.parse.parse_qsl(parts.query, keep_blank_values=True)
        if k.lower() not in SECRET_QUERY_KEYS
    ]
    return urllib.parse.urlunsplit(
        parts._replace(netloc="@".join(netloc), query=urllib.parse.urlencode(query))
    )


def manifests(spec, base) -> list[dict]:
    """The creator Job and the workers' Indexed Job, as dicts for yaml.safe_dump_all."""
    k8s = spec.settings["kubernetes"]
    storage, tracking = spec.settings["storage"], str(base.tracking.tracking_uri)
    if scheme_of(storage) not in ("postgresql", "mysql"):
        raise ConfigError(
            f"sweep.storage={redact_uri(storage)} cannot be used by pods: they need a database "
            "server they can reach (the PostgreSQL or PgBouncer of `make server`)."
        )
    if base.tracking.enabled and (
        scheme_of(tracking) not in ("http", "https") or mask_secrets(tracking) != tracking
    ):
        raise ConfigError(
            f"tracking.tracking_uri={redact_uri(tracking)} cannot be used by pods: they need "
            "an MLflow server they can reach (http://host:port), without credentials in it "
            "(MLflow reads MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD)."
        )
    name = re.sub(r"[^a-z0-9-]", "-", spec.study_name.lower()).strip("-")[:40] or "sweep"
    sweep = Path(spec.file).stem if Path(spec.file).parent.name == "sweeps" else spec.file
    overrides = [
        o for o in spec.overrides if not o.split("=", 1)[0].lstrip("+~").startswith(PASSED_ON_NOT)
    ]
    command = ["python", "-m", "mnist_sweep.sweep", "--sweep", sweep, *overrides]
    env = [
        {"name": "SWEEP_STORAGE", "value": _without_password(storage)},
        {"name": "PGPASSWORD_FILE", "value": f"{SECRET_DIR}/password"},
    ]
    if base.tracking.enabled:
        env.append({"name": "MLFLOW_TRACKING_URI", "value": tracking})
    mounts = [{"name": "pg-password", "mountPath": SECRET_DIR, "readOnly": True}]
    volumes: list[dict] = [{"name": "pg-password", "secret": {"secretName": k8s["secret"]}}]
    if k8s["data_claim"]:
        mounts.append({"name": "data", "mountPath": str(base.data.root)})
        volumes.append({"name": "data", "persistentVolumeClaim": {"claimName": k8s["data_claim"]}})
    labels = {"app.kubernetes.io/name": "mnist-sweep", "mnist-sweep/study": name}

    def job(job_name: str, args: list[str], gpus: int, pods: int, indexed: bool) -> dict:
        limits: dict[str, Any] = {"cpu": k8s["cpu"], "memory": k8s["memory"]}
        if gpus:
            limits["nvidia.com/gpu"] = gpus
        spec_: dict[str, Any] = {
            "backoffLimit": 6,
            "template": {
                "metadata": {"labels": labels},
                "spec": {
                    # a worker that starts before the study exists fails (--join) and is restarted
                    "restartPolicy": "OnFailure",
                    "containers": [
                        {
                            "name": "worker" if indexed else "create-study",
                            "image": k8s["image"],
                            "args": args,
                            "env": env,
                            "volumeMounts": mounts,
                            "resources": {"limits": limits},
                        }
                    ],
                    "volumes": volumes,
                },
            },
        }
        if indexed:
            spec_ |= {"completionMode": "Indexed", "completions": pods, "parallelism": pods}
        metadata: dict[str, Any] = {"name": job_name, "labels": labels}
        if k8s["namespace"]:
            metadata["namespace"] = k8s["namespace"]
        return {"apiVersion": "batch/v1", "kind": "Job", "metadata": metadata, "spec": spec_}

    documents = [
        job(f"{name}-create", [*command[:3], "--create-only", *command[3:]], 0, 1, False),
        job(
            f"{name}-workers",
            # the pods run the search; a confirmation over fresh seeds (sweep.confirm) is made
            # by a command that waits for the search's end: `--confirm` afterwards
            [*command[:3], "--join", *command[3:], "sweep.workers=1", "sweep.confirm.top=0"],
            k8s["gpus_per_pod"],
            k8s["workers"],
            True,
        ),
    ]
    return json.loads(json.dumps(documents))  # nothing shared, so no YAML anchors

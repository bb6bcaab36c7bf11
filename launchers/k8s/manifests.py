"""The Kubernetes objects of a pre-training job and of a partitioned ingest, as plain data.

Built on what clusters already run, no scheduler of ours:

- **training**, flavour ``job`` (no operator): an Indexed ``batch/v1`` Job,
  one pod per node, the completion index as the node's rank, and a headless
  Service that gives pod 0 the stable name ``<job>-0.<job>`` for the
  rendezvous; flavour ``pytorchjob``: the Kubeflow Training Operator's
  PyTorchJob (Master + Workers), which sets ``RANK``/``MASTER_ADDR`` itself.
  Both run the same container command, :mod:`launchers.node`.
- **ingest**: an Indexed Job whose pod *i* ingests partition *i* of the
  inputs (by hash, ``medssl ingest --partition i/N``), and a finalize Job that
  waits for every part and merges them (``medssl ingest --finalize N``).

Fault tolerance (Indexed Jobs): pods run with ``restartPolicy: Never`` under
a pod failure policy: exit code 2 (a config or dataset the run refuses) fails
the Job at once, the disrupted pod of a pre-emption, eviction or drain is
retried without counting, and any other failure counts against its index's
``backoffLimitPerIndex`` (a lost node fails every node, once each). A replaced
pod gets its index back, every rank resumes from the newest complete
checkpoint on the shared runs volume, and SIGTERM gives the run ``grace_s``
(torchrun's shutdown timeout included) to write a checkpoint before the
kubelet's SIGKILL. The PyTorchJob's operator has no pod failure policy: it
restarts failed pods in place up to ``runPolicy.backoffLimit``.

Security: pods run as a non-root user with a read-only root filesystem
(``/tmp`` is an emptyDir and ``HOME``), no privilege escalation, no Linux
capabilities, the RuntimeDefault seccomp profile, and a ServiceAccount whose
API token is not even mounted: training and ingest need nothing from the API.
Credentials (MLflow, the site secret for pseudonyms) come from Secrets.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any, Literal

APP = "medssl-scale"
CONFIG_DIR = "/etc/medssl"
DATASETS = "/datasets"  # the datasets volume (ingest writes it, training reads it)
RUNS = "/runs"  # the shared runs volume: run directories and checkpoints, seen by every node
SOURCES = "/sources"  # the raw collections an ingest reads
RENDEZVOUS_PORT = 29500
INDEX_ANNOTATION = "metadata.annotations['batch.kubernetes.io/job-completion-index']"
JOB_NAME_LABEL = "metadata.labels['batch.kubernetes.io/job-name']"
EXIT_BAD_CONFIG = 2  # launchers.node and `medssl ingest` exit 2 on a refusal no retry can fix

Obj = dict[str, Any]


@dataclasses.dataclass(frozen=True)
class Cluster:
    """What the cluster provides: where things are and what they are called."""

    namespace: str = "medssl"
    image: str = "ghcr.io/medssl-scale/medssl-scale:0.1.0"
    datasets_claim: str = "medssl-datasets"  # PVC holding dataset directories
    runs_claim: str = "medssl-runs"  # ReadWriteMany PVC for run directories
    sources_claim: str = "medssl-sources"  # PVC holding raw collections (ingest only, mounted read-only)
    mlflow_uri: str = "http://medssl-mlflow:5000"
    mlflow_secret: str = "medssl-mlflow-client"  # keys: username, password
    site_secret: str = "medssl-site-secret"  # key: secret (HMAC key of the pseudonyms)
    service_account: str = "medssl-runner"
    image_pull_secret: str | None = None


@dataclasses.dataclass(frozen=True)
class Train:
    name: str
    nodes: int = 2
    gpus_per_node: int = 8
    nproc_per_node: int | None = None  # default: one per GPU, 1 without GPUs
    cpu: str = "16"
    memory: str = "128Gi"
    shm: str = "32Gi"  # DataLoader workers pass batches through /dev/shm
    grace_s: int = 600  # SIGTERM to SIGKILL: the on-SIGTERM checkpoint must fit in it
    # Failures each node (index) may have before the Job gives up (disruptions excluded). Per index, because a
    # lost node fails every node of the run: one shared limit would be used up N at a time.
    retries_per_node: int = 6
    flavor: Literal["job", "pytorchjob"] = "job"

    @property
    def nproc(self) -> int:
        return self.nproc_per_node or max(1, self.gpus_per_node)


@dataclasses.dataclass(frozen=True)
class Ingest:
    name: str
    dataset: str  # directory name under the datasets volume
    sources: tuple[str, ...] = ("collection",)  # paths under the sources volume
    partitions: int = 4
    workers: int = 4  # processes per partition pod
    cpu: str = "4"
    memory: str = "16Gi"
    extra_args: tuple[str, ...] = ()  # more `medssl ingest` options (--spacing, --modality, ...)
    retries_per_part: int = 4


def dns_name(text: str, limit: int = 52) -> str:
    """A DNS-1123 label from a run name (Indexed Job pods append -<index> and a suffix: stay short)."""
    name = re.sub(r"[^a-z0-9-]+", "-", text.lower()).strip("-")[:limit].rstrip("-")
    if not name:
        raise ValueError(f"cannot make a Kubernetes name from {text!r}")
    return name


def _labels(name: str, component: str) -> dict[str, str]:
    return {"app.kubernetes.io/name": APP, "app.kubernetes.io/component": component, "app.kubernetes.io/instance": name}


def _meta(name: str, component: str, namespace: str, instance: str | None = None) -> Obj:
    return {"name": name, "namespace": namespace, "labels": _labels(instance or name, component)}


def _env(name: str, value: str | int) -> Obj:
    return {"name": name, "value": str(value)}


def _secret_env(name: str, secret: str, key: str) -> Obj:
    return {"name": name, "valueFrom": {"secretKeyRef": {"name": secret, "key": key}}}


def _index_env(name: str) -> Obj:
    return {"name": name, "valueFrom": {"fieldRef": {"fieldPath": INDEX_ANNOTATION}}}


def _pod_security() -> Obj:
    return {"runAsNonRoot": True, "runAsUser": 1000, "runAsGroup": 1000, "fsGroup": 1000,
            "fsGroupChangePolicy": "OnRootMismatch", "seccompProfile": {"type": "RuntimeDefault"}}


def _container_security() -> Obj:
    return {"allowPrivilegeEscalation": False, "readOnlyRootFilesystem": True, "capabilities": {"drop": ["ALL"]}}


def _common_env() -> list[Obj]:
    # The root filesystem is read-only: caches (torch extensions, Triton, matplotlib) go under the /tmp emptyDir.
    return [_env("HOME", "/tmp"), _env("PYTHONUNBUFFERED", "1")]


def _pod(cluster: Cluster, container: Obj, volumes: list[Obj], restart: str, grace_s: int, extra: Obj | None = None) -> Obj:
    spec: Obj = {
        "serviceAccountName": cluster.service_account,
        "automountServiceAccountToken": False,
        "enableServiceLinks": False,
        "restartPolicy": restart,
        "terminationGracePeriodSeconds": grace_s,
        "securityContext": _pod_security(),
        "containers": [container],
        "volumes": volumes,
        **(extra or {}),
    }
    if cluster.image_pull_secret:
        spec["imagePullSecrets"] = [{"name": cluster.image_pull_secret}]
    return spec


def _failure_policy(container: str) -> Obj:
    return {"rules": [
        {"action": "FailJob", "onExitCodes": {"containerName": container, "operator": "In", "values": [EXIT_BAD_CONFIG]}},
        # status: required by the API before Kubernetes 1.35 (defaulted to "True" from 1.35 on)
        {"action": "Ignore", "onPodConditions": [{"type": "DisruptionTarget", "status": "True"}]},
    ]}


# -- training ---------------------------------------------------------------------------------------

def config_map(train: Train, cluster: Cluster, config_yaml: str) -> Obj:
    return {"apiVersion": "v1", "kind": "ConfigMap",
            "metadata": _meta(f"{train.name}-config", "train", cluster.namespace, train.name),
            "data": {"config.yaml": config_yaml}}


def _train_container(train: Train, cluster: Cluster, name: str, env: list[Obj], port: str = "rendezvous") -> Obj:
    resources: Obj = {"requests": {"cpu": train.cpu, "memory": train.memory}, "limits": {"memory": train.memory}}
    if train.gpus_per_node:
        resources["requests"]["nvidia.com/gpu"] = train.gpus_per_node
        resources["limits"]["nvidia.com/gpu"] = train.gpus_per_node
    return {
        "name": name,
        "image": cluster.image,
        # args, not command: the image's entrypoint (tini) stays PID 1 and passes the kubelet's SIGTERM on.
        "args": ["python", "-m", "launchers.node", "--config", f"{CONFIG_DIR}/config.yaml", "--resume", "auto", "--no-progress"],
        "env": [
            *env,
            _env("MEDSSL_NNODES", train.nodes),
            _env("MEDSSL_NPROC_PER_NODE", train.nproc),
            # torchrun waits this long for its ranks' SIGTERM checkpoint (its own default is 30 s), inside the grace period
            _env("MEDSSL_SHUTDOWN_TIMEOUT", max(30, train.grace_s - 30)),
            _env("MLFLOW_TRACKING_URI", cluster.mlflow_uri),
            _secret_env("MLFLOW_TRACKING_USERNAME", cluster.mlflow_secret, "username"),
            _secret_env("MLFLOW_TRACKING_PASSWORD", cluster.mlflow_secret, "password"),
            # NCCL: fail fast on a broken peer rather than hang; cluster overlays add NCCL_SOCKET_IFNAME / NCCL_IB_HCA.
            _env("TORCH_NCCL_ASYNC_ERROR_HANDLING", "1"),
            _env("NCCL_DEBUG", "WARN"),
            *_common_env(),
        ],
        "ports": [{"name": port, "containerPort": RENDEZVOUS_PORT}],
        "resources": resources,
        "securityContext": _container_security(),
        "volumeMounts": [
            {"name": "config", "mountPath": CONFIG_DIR, "readOnly": True},
            {"name": "datasets", "mountPath": DATASETS, "readOnly": True},
            {"name": "runs", "mountPath": RUNS},
            {"name": "dshm", "mountPath": "/dev/shm"},
            {"name": "tmp", "mountPath": "/tmp"},
        ],
    }


def _train_volumes(train: Train, cluster: Cluster) -> list[Obj]:
    return [
        {"name": "config", "configMap": {"name": f"{train.name}-config"}},
        {"name": "datasets", "persistentVolumeClaim": {"claimName": cluster.datasets_claim, "readOnly": True}},
        {"name": "runs", "persistentVolumeClaim": {"claimName": cluster.runs_claim}},
        {"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": train.shm}},
        {"name": "tmp", "emptyDir": {"sizeLimit": "20Gi"}},
    ]


def _gpu_tolerations(train: Train) -> Obj:
    return {"tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]} if train.gpus_per_node else {}


def train_service(train: Train, cluster: Cluster) -> Obj:
    """Headless: pod i of the Indexed Job answers as <job>-i.<job>, ready or not (rank 0 must be found while it waits)."""
    return {"apiVersion": "v1", "kind": "Service", "metadata": _meta(train.name, "train", cluster.namespace),
            "spec": {"clusterIP": "None", "publishNotReadyAddresses": True,
                     "selector": {"app.kubernetes.io/instance": train.name, "app.kubernetes.io/component": "train"},
                     "ports": [{"name": "rendezvous", "port": RENDEZVOUS_PORT, "targetPort": RENDEZVOUS_PORT}]}}


def train_job(train: Train, cluster: Cluster) -> Obj:
    # Pod 0 of the Indexed Job answers as <job>-0.<subdomain>; the job's own name, so a Kustomize namePrefix
    # carries over (the subdomain and the Service are renamed alike, the subdomain by a patch).
    env = [_index_env("MEDSSL_NODE_RANK"), {"name": "JOB_NAME", "valueFrom": {"fieldRef": {"fieldPath": JOB_NAME_LABEL}}},
           _env("MEDSSL_MASTER_ADDR", "$(JOB_NAME)-0.$(JOB_NAME)"), _env("MEDSSL_MASTER_PORT", RENDEZVOUS_PORT)]
    container = _train_container(train, cluster, "train", env)
    pod = _pod(cluster, container, _train_volumes(train, cluster), "Never", train.grace_s,
               {"subdomain": train.name, **_gpu_tolerations(train)})
    return {
        "apiVersion": "batch/v1", "kind": "Job",
        "metadata": _meta(train.name, "train", cluster.namespace),
        "spec": {
            "completionMode": "Indexed",
            "completions": train.nodes,
            "parallelism": train.nodes,
            "backoffLimitPerIndex": train.retries_per_node,
            "maxFailedIndexes": 0,  # a node out of retries ends the run: the others cannot train without it
            "podFailurePolicy": _failure_policy("train"),
            "podReplacementPolicy": "Failed",  # a replacement starts once the old pod is gone, never beside it
            "ttlSecondsAfterFinished": 7 * 24 * 3600,
            "template": {"metadata": {"labels": _labels(train.name, "train")}, "spec": pod},
        },
    }


def pytorch_job(train: Train, cluster: Cluster) -> Obj:
    """The same pods under the Training Operator, which names the master and sets RANK/MASTER_ADDR/MASTER_PORT."""

    def replica(count: int) -> Obj:
        # The operator requires this container name, and takes MASTER_PORT from the port of this name.
        container = _train_container(train, cluster, "pytorch", [], port="pytorchjob-port")
        pod = _pod(cluster, container, _train_volumes(train, cluster), "OnFailure", train.grace_s, _gpu_tolerations(train))
        return {"replicas": count, "restartPolicy": "OnFailure",
                "template": {"metadata": {"labels": _labels(train.name, "train")}, "spec": pod}}

    replicas = {"Master": replica(1)}
    if train.nodes > 1:
        replicas["Worker"] = replica(train.nodes - 1)
    return {
        "apiVersion": "kubeflow.org/v1", "kind": "PyTorchJob",
        "metadata": _meta(train.name, "train", cluster.namespace),
        "spec": {"runPolicy": {"backoffLimit": train.retries_per_node * train.nodes, "cleanPodPolicy": "None",
                               "ttlSecondsAfterFinished": 7 * 24 * 3600},
                 "pytorchReplicaSpecs": replicas},
    }


def service_account(cluster: Cluster) -> Obj:
    meta = _meta(cluster.service_account, "runner", cluster.namespace)
    return {"apiVersion": "v1", "kind": "ServiceAccount", "metadata": meta, "automountServiceAccountToken": False}


def training(train: Train, cluster: Cluster, config_yaml: str) -> list[Obj]:
    """Every object of a training job, in the order they are applied."""
    objs = [service_account(cluster), config_map(train, cluster, config_yaml)]
    if train.flavor == "pytorchjob":
        return [*objs, pytorch_job(train, cluster)]
    return [*objs, train_service(train, cluster), train_job(train, cluster)]


# -- ingest ---------------------------------------------------------------------------------------

def _ingest_container(ingest: Ingest, cluster: Cluster, name: str, args: list[str], env: list[Obj]) -> Obj:
    return {
        "name": name,
        "image": cluster.image,
        "args": ["medssl", "ingest", *args],
        "env": [*env, _secret_env("MEDSSL_SITE_SECRET", cluster.site_secret, "secret"), *_common_env()],
        "resources": {"requests": {"cpu": ingest.cpu, "memory": ingest.memory}, "limits": {"memory": ingest.memory}},
        "securityContext": _container_security(),
        "volumeMounts": [
            {"name": "sources", "mountPath": SOURCES, "readOnly": True},
            {"name": "datasets", "mountPath": DATASETS},
            {"name": "tmp", "mountPath": "/tmp"},
        ],
    }


def _ingest_volumes(cluster: Cluster) -> list[Obj]:
    return [
        {"name": "sources", "persistentVolumeClaim": {"claimName": cluster.sources_claim, "readOnly": True}},
        {"name": "datasets", "persistentVolumeClaim": {"claimName": cluster.datasets_claim}},
        {"name": "tmp", "emptyDir": {"sizeLimit": "20Gi"}},
    ]


def ingest_jobs(ingest: Ingest, cluster: Cluster) -> list[Obj]:
    """The partition Job and the finalize Job: applied together, the finalize pod waits for every part."""
    out = f"{DATASETS}/{ingest.dataset}"
    sources = [f"{SOURCES}/{s}".rstrip("/") for s in ingest.sources]
    ns = cluster.namespace
    part_args = [*sources, "--out", out, "--partition", f"$(PARTITION)/{ingest.partitions}", "--workers", str(ingest.workers),
                 "--resume", "--no-progress", *ingest.extra_args]
    part = _ingest_container(ingest, cluster, "ingest", part_args, [_index_env("PARTITION")])
    parts = {
        "apiVersion": "batch/v1", "kind": "Job", "metadata": _meta(f"{ingest.name}-parts", "ingest", ns, ingest.name),
        "spec": {"completionMode": "Indexed", "completions": ingest.partitions, "parallelism": ingest.partitions,
                 "backoffLimitPerIndex": ingest.retries_per_part, "maxFailedIndexes": 0, "podFailurePolicy": _failure_policy("ingest"),
                 "podReplacementPolicy": "Failed", "ttlSecondsAfterFinished": 7 * 24 * 3600,
                 "template": {"metadata": {"labels": _labels(ingest.name, "ingest")},
                              "spec": _pod(cluster, part, _ingest_volumes(cluster), "Never", 120)}},
    }
    fin_args = ["--out", out, "--finalize", str(ingest.partitions), "--wait", "604800", "--no-progress"]
    fin = _ingest_container(ingest, cluster, "finalize", fin_args, [])
    fin["resources"]["requests"]["cpu"] = "1"  # it waits, then renames: memory for the manifests, little CPU
    finalize = {
        "apiVersion": "batch/v1", "kind": "Job", "metadata": _meta(f"{ingest.name}-finalize", "ingest-finalize", ns, ingest.name),
        "spec": {"backoffLimit": 3, "podFailurePolicy": _failure_policy("finalize"), "podReplacementPolicy": "Failed",
                 "ttlSecondsAfterFinished": 7 * 24 * 3600,
                 "template": {"metadata": {"labels": _labels(ingest.name, "ingest-finalize")},
                              "spec": _pod(cluster, fin, _ingest_volumes(cluster), "Never", 120)}},
    }
    return [service_account(cluster), parts, finalize]

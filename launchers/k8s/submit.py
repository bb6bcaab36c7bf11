"""Apply rendered objects through the Kubernetes API (server-side apply), then follow the job: status and logs."""

from __future__ import annotations

import threading
import time
from typing import Any

FIELD_MANAGER = "medssl-launch"
JOB_KINDS = {"Job": ("batch", "v1", "jobs"), "PyTorchJob": ("kubeflow.org", "v1", "pytorchjobs")}


class ClusterError(RuntimeError):
    """No cluster to talk to, or the API refused an object: the message says which and why."""


def _client():
    try:
        from kubernetes import client, config
        from kubernetes.config.config_exception import ConfigException
    except ImportError as e:  # pragma: no cover - a dependency of the package
        raise ClusterError(f"the kubernetes Python client is not installed ({e})") from None
    try:
        config.load_incluster_config()
    except ConfigException:
        try:
            config.load_kube_config()
        except (ConfigException, FileNotFoundError, TypeError) as e:
            raise ClusterError(f"no Kubernetes cluster configured (in-cluster service account or ~/.kube/config / KUBECONFIG): {e}") from None
    return client


def _api_errors() -> tuple[type[BaseException], ...]:
    import urllib3
    from kubernetes.client.rest import ApiException

    return ApiException, urllib3.exceptions.HTTPError


def _finished(obj: dict[str, Any]) -> bool | None:
    """True when a Job or PyTorchJob has ended, False while it runs."""
    conds = {c["type"]: c["status"] for c in (obj.get("status") or {}).get("conditions") or []}
    return any(conds.get(t) == "True" for t in ("Complete", "Failed", "Succeeded"))


def apply(objs: list[dict[str, Any]], wait_s: float = 300) -> None:
    """Server-side apply of each object, in order; a refusal names the object and the API's reason.

    A job of the same name that has ended is deleted first (its pods with it), so submitting a run again
    starts it again, and it resumes from its checkpoint; one that is still running is left alone: refused.
    """
    client = _client()
    from kubernetes.dynamic import DynamicClient
    from kubernetes.dynamic.exceptions import NotFoundError, ResourceNotFoundError

    errors = _api_errors()
    try:
        dyn = DynamicClient(client.ApiClient())
    except errors as e:
        raise ClusterError(f"cannot reach the Kubernetes API: {e}") from None
    for obj in objs:
        kind, name, ns = obj["kind"], obj["metadata"]["name"], obj["metadata"].get("namespace")
        try:
            api = dyn.resources.get(api_version=obj["apiVersion"], kind=kind)
        except ResourceNotFoundError:
            hint = " (install the Kubeflow Training Operator, or use --flavor job)" if kind == "PyTorchJob" else ""
            raise ClusterError(f"the cluster does not know {obj['apiVersion']} {kind}{hint}") from None
        try:
            if kind in JOB_KINDS:
                try:
                    old = api.get(name=name, namespace=ns).to_dict()
                except NotFoundError:
                    old = None
                if old is not None and not _finished(old):
                    raise ClusterError(f"{kind}/{name} is still running in {ns}: follow it (kubectl -n {ns} get {kind.lower()}/{name}), "
                                       "delete it, or submit under another --name")
                if old is not None:
                    api.delete(name=name, namespace=ns, body={"propagationPolicy": "Foreground"})
                    _wait_gone(api, name, ns, wait_s, NotFoundError)
                    print(f"deleted the ended {kind}/{name}")
            api.server_side_apply(body=obj, name=name, namespace=ns, field_manager=FIELD_MANAGER, force_conflicts=True)
        except errors as e:
            body = getattr(e, "body", "") or ""
            raise ClusterError(f"{kind}/{name}: the API refused it: {getattr(e, 'status', '')} {getattr(e, 'reason', e)}: {body[:500]}") from None
        print(f"applied {kind}/{name}" + (f" in {ns}" if ns else ""))


def _wait_gone(api: Any, name: str, ns: str, wait_s: float, not_found: type[Exception]) -> None:
    deadline = time.monotonic() + wait_s
    while time.monotonic() < deadline:
        try:
            api.get(name=name, namespace=ns)
        except not_found:
            return
        time.sleep(2)
    raise ClusterError(f"{name} was not deleted within {wait_s:.0f} s")


def follow(namespace: str, job: str, kind: str = "Job", selector: str | None = None, poll_s: float = 5.0) -> int:
    """Print the job's state changes, why pods wait, and the logs of its first pod until it ends; 0 if it succeeded.

    Ctrl-C stops following, not the job.
    """
    client = _client()
    core = client.CoreV1Api()
    custom = client.CustomObjectsApi()
    group, version, plural = JOB_KINDS[kind]
    selector = selector or f"app.kubernetes.io/instance={job}"
    streams: dict[tuple[str, int], threading.Thread] = {}
    said: set[str] = set()
    last = None
    try:
        while True:
            obj = custom.get_namespaced_custom_object(group, version, namespace, plural, job)
            status = obj.get("status") or {}
            conds = {c["type"]: c["status"] for c in status.get("conditions") or []}
            if kind == "Job":
                state = f"active {status.get('active', 0)}, succeeded {status.get('succeeded', 0)}, failed {status.get('failed', 0)}"
            else:
                state = ", ".join(t for t, v in conds.items() if v == "True") or "pending"
            if state != last:
                print(f"{kind}/{job}: {state}", flush=True)
                last = state
            for pod in core.list_namespaced_pod(namespace, label_selector=selector).items:
                _waiting_reasons(pod, said)
                labels, annotations = pod.metadata.labels or {}, pod.metadata.annotations or {}
                first = (labels.get("training.kubeflow.org/replica-type", "master").lower() == "master"
                         and annotations.get("batch.kubernetes.io/job-completion-index", "0") == "0")
                restarts = sum(c.restart_count for c in pod.status.container_statuses or [])
                key = (pod.metadata.name, restarts)  # a container restarted in place is streamed again
                if first and pod.status.phase in ("Running", "Succeeded", "Failed") and key not in streams:
                    streams[key] = threading.Thread(target=_stream, args=(core, namespace, pod.metadata.name), daemon=True)
                    streams[key].start()
            if _finished(obj):
                for t in streams.values():
                    t.join(timeout=30)  # the last lines ("finished at step ...") before the verdict
                ok = conds.get("Complete") == "True" or conds.get("Succeeded") == "True"
                print(f"{kind}/{job}: {'succeeded' if ok else 'failed'}", flush=True)
                return 0 if ok else 1
            time.sleep(poll_s)
    except KeyboardInterrupt:
        print(f"\nstopped following; the job goes on: kubectl -n {namespace} get {kind.lower()}/{job}")
        return 130


def _waiting_reasons(pod: Any, said: set[str]) -> None:
    """Why a pod does not run (image pull, missing Secret, unschedulable): said once each, else a job just sits at 'active 0'."""
    notes = [f"{c.name}: {c.state.waiting.reason}: {c.state.waiting.message or ''}" for c in pod.status.container_statuses or []
             if c.state and c.state.waiting and c.state.waiting.reason not in (None, "ContainerCreating", "PodInitializing")]
    notes += [f"{c.reason}: {c.message}" for c in pod.status.conditions or [] if c.type == "PodScheduled" and c.status == "False"]
    for note in notes:
        line = f"[{pod.metadata.name}] waiting: {note}"
        if line not in said:
            said.add(line)
            print(line, flush=True)


def _stream(core: Any, namespace: str, pod: str) -> None:
    try:
        for line in core.read_namespaced_pod_log(pod, namespace, follow=True, _preload_content=False):  # urllib3 yields lines
            print(f"[{pod}] {line.decode(errors='replace').rstrip()}", flush=True)
    except Exception as e:  # a pod replaced mid-stream: the next one is picked up by follow()
        print(f"[{pod}] log stream ended: {e}", flush=True)


def delete_job(namespace: str, name: str) -> None:
    client = _client()
    client.BatchV1Api().delete_namespaced_job(name, namespace, propagation_policy="Foreground")

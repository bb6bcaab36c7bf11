"""Apply rendered objects through the Kubernetes API (server-side apply), then follow the job: status and logs."""

from __future__ import annotations

import threading
import time
from typing import Any

FIELD_MANAGER = "medssl-launch"


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


def apply(objs: list[dict[str, Any]]) -> None:
    """Server-side apply of each object, in order; a refusal names the object and the API's reason."""
    client = _client()
    from kubernetes.client.rest import ApiException
    from kubernetes.dynamic import DynamicClient
    from kubernetes.dynamic.exceptions import ResourceNotFoundError

    dyn = DynamicClient(client.ApiClient())
    for obj in objs:
        kind, name, ns = obj["kind"], obj["metadata"]["name"], obj["metadata"].get("namespace")
        try:
            api = dyn.resources.get(api_version=obj["apiVersion"], kind=kind)
        except ResourceNotFoundError:
            hint = " (install the Kubeflow Training Operator, or use --flavor job)" if kind == "PyTorchJob" else ""
            raise ClusterError(f"the cluster does not know {obj['apiVersion']} {kind}{hint}") from None
        try:
            api.server_side_apply(body=obj, name=name, namespace=ns, field_manager=FIELD_MANAGER, force_conflicts=True)
        except ApiException as e:
            hint = " (a Job's pod template cannot change: delete the old job or pick another --name)" if e.status == 422 else ""
            raise ClusterError(f"{kind}/{name}: the API refused it: {e.status} {e.reason}: {(e.body or '')[:500]}{hint}") from None
        print(f"applied {kind}/{name}" + (f" in {ns}" if ns else ""))


def follow(namespace: str, job: str, kind: str = "Job", selector: str | None = None, poll_s: float = 5.0) -> int:
    """Print the job's state changes and stream the logs of its first pod until it ends; 0 if it succeeded.

    Ctrl-C stops following, not the job.
    """
    client = _client()
    core, batch = client.CoreV1Api(), client.BatchV1Api()
    custom = client.CustomObjectsApi()
    selector = selector or f"app.kubernetes.io/instance={job}"
    streaming: set[str] = set()
    last = None
    try:
        while True:
            if kind == "Job":
                st = batch.read_namespaced_job_status(job, namespace).status
                conds = {c.type: c.status for c in (st.conditions or [])}
                state = f"active {st.active or 0}, succeeded {st.succeeded or 0}, failed {st.failed or 0}"
                done = "True" in (conds.get("Complete"), conds.get("Failed"))
                ok = conds.get("Complete") == "True"
            else:
                obj = custom.get_namespaced_custom_object("kubeflow.org", "v1", namespace, "pytorchjobs", job)
                conds = {c["type"]: c["status"] for c in obj.get("status", {}).get("conditions", [])}
                state = ", ".join(t for t, s in conds.items() if s == "True") or "pending"
                done = "True" in (conds.get("Succeeded"), conds.get("Failed"))
                ok = conds.get("Succeeded") == "True"
            if state != last:
                print(f"{kind}/{job}: {state}", flush=True)
                last = state
            for pod in core.list_namespaced_pod(namespace, label_selector=selector).items:
                index = (pod.metadata.annotations or {}).get("batch.kubernetes.io/job-completion-index", "0")
                first = index == "0" and "-worker-" not in pod.metadata.name  # node 0 (or the PyTorchJob master), or a plain Job's pod
                if first and pod.status.phase in ("Running", "Succeeded", "Failed") and pod.metadata.name not in streaming:
                    streaming.add(pod.metadata.name)
                    threading.Thread(target=_stream, args=(core, namespace, pod.metadata.name), daemon=True).start()
            if done:
                return 0 if ok else 1
            time.sleep(poll_s)
    except KeyboardInterrupt:
        print(f"\nstopped following; the job goes on: kubectl -n {namespace} get {kind.lower()}/{job}")
        return 130


def _stream(core: Any, namespace: str, pod: str) -> None:
    try:
        for line in core.read_namespaced_pod_log(pod, namespace, follow=True, _preload_content=False):  # urllib3 yields lines
            print(f"[{pod}] {line.decode(errors='replace').rstrip()}", flush=True)
    except Exception as e:  # a pod replaced mid-stream: the next one is picked up by follow()
        print(f"[{pod}] log stream ended: {e}", flush=True)

"""Run a rendered pod's container as a local process, with the environment the kubelet would give it.

No cluster here, so the parts Kubernetes would do are done as it does them:
environment from ``value``, downward-API ``fieldRef`` (the completion index)
and ``secretKeyRef`` (a missing, non-optional key is an error, as the
kubelet's CreateContainerConfigError); ``$(VAR)`` expanded in command and
args; volumes (ConfigMaps written out, PVCs shared between pods, emptyDirs
per pod) at local folders instead of their mount paths, so the mount paths
in arguments, environment and ConfigMap contents are relocated; Service
host names resolve to 127.0.0.1 and their ports to the given local ones.
Also the Job controller's pod failure policy, to say what a pod's exit does.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

INDEX_FIELD = "metadata.annotations['batch.kubernetes.io/job-completion-index']"
JOB_NAME_FIELD = "metadata.labels['batch.kubernetes.io/job-name']"
EXECUTABLES = {"python": [sys.executable], "medssl": [sys.executable, "-m", "medssl_scale.cli"], "mlflow": [sys.executable, "-m", "mlflow"]}


def pod_spec(obj: dict[str, Any]) -> dict[str, Any]:
    if obj["kind"] == "PyTorchJob":
        return obj["spec"]["pytorchReplicaSpecs"]["Master"]["template"]["spec"]
    return obj["spec"]["template"]["spec"]


def expand(text: str, env: dict[str, str]) -> str:
    """Kubernetes' $(VAR) expansion: defined variables are replaced, $$ is a literal $, the rest stays."""
    return re.sub(r"\$\$|\$\(([A-Za-z_][A-Za-z0-9_]*)\)", lambda m: "$" if m.group(0) == "$$" else env.get(m.group(1), m.group(0)), text)


class Pod:
    def __init__(self, obj: dict[str, Any], root: Path, index: int = 0, claims: dict[str, Path] | None = None,
                 configmaps: dict[str, dict[str, str]] | None = None, secrets: dict[tuple[str, str], str] | None = None,
                 hosts: dict[str, str] | None = None, ports: dict[str, str] | None = None, container: int = 0):
        self.spec = pod_spec(obj)
        self.job_name = obj["metadata"]["name"]
        self.container = self.spec["containers"][container]
        self.root, self.index = Path(root), index
        self.claims, self.configmaps, self.secrets = claims or {}, configmaps or {}, secrets or {}
        self.hosts, self.ports = hosts or {}, ports or {}
        self._mount()

    def _mount(self) -> None:
        volumes = {v["name"]: v for v in self.spec.get("volumes", [])}
        mounts: dict[str, str] = {}
        pending = []
        for m in self.container.get("volumeMounts", []):
            if m["mountPath"] == "/dev/shm":
                continue  # the machine's own
            vol = volumes[m["name"]]
            if "persistentVolumeClaim" in vol:
                local = self.claims[vol["persistentVolumeClaim"]["claimName"]]  # shared by every pod, like the claim
            else:
                local = self.root / f"pod-{self.index}" / m["name"]
            local.mkdir(parents=True, exist_ok=True)
            if "configMap" in vol:
                pending += [(local / key, text) for key, text in self.configmaps[vol["configMap"]["name"]].items()]
            mounts[m["mountPath"]] = str(local)
        self.mounts = mounts  # relocate() below needs them
        for path, text in pending:  # what a ConfigMap says about mount paths must point at the local folders too
            path.write_text(self.relocate(text))

    def relocate(self, text: str) -> str:
        """Mount paths to their local folders (one pass, so a local path is never relocated again)."""
        if not self.mounts:
            return text
        pattern = "|".join(re.escape(p) for p in sorted(self.mounts, key=len, reverse=True))
        return re.sub(rf"(?<![\w.-])({pattern})(?=/|$|[\s\"',])", lambda m: self.mounts[m.group(1)], text)

    def env(self) -> dict[str, str]:
        env: dict[str, str] = {}
        for e in self.container.get("env", []):
            if "value" in e:
                value = expand(e["value"], env)
            elif "fieldRef" in e["valueFrom"]:
                field = e["valueFrom"]["fieldRef"]["fieldPath"]
                assert field in (INDEX_FIELD, JOB_NAME_FIELD), e  # what the Job controller puts on its pods
                value = str(self.index) if field == INDEX_FIELD else self.job_name
            else:
                ref = e["valueFrom"]["secretKeyRef"]
                if (ref["name"], ref["key"]) not in self.secrets:
                    if ref.get("optional"):
                        continue
                    raise KeyError(f"CreateContainerConfigError: secret {ref['name']!r} has no key {ref['key']!r}")
                value = self.secrets[(ref["name"], ref["key"])]
            env[e["name"]] = value
        for name, value in env.items():
            value = self.relocate(value)
            for host, local in self.hosts.items():
                value = value.replace(host, local)
            env[name] = self.ports.get(value, value) if name.endswith("PORT") else value
        return env

    def command(self) -> list[str]:
        env = self.env()
        words = [self.relocate(expand(w, env)) for w in [*self.container.get("command", []), *self.container.get("args", [])]]
        return [*EXECUTABLES.get(words[0], [words[0]]), *words[1:]]

    def start(self, **kw: Any) -> subprocess.Popen:
        env = {"PATH": os.environ["PATH"], "OMP_NUM_THREADS": "1", **self.env()}
        cwd = self.root / f"pod-{self.index}" / "workdir"
        cwd.mkdir(parents=True, exist_ok=True)
        return subprocess.Popen(self.command(), env=env, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                start_new_session=True, **kw)


def failure_action(job: dict[str, Any], container: str, exit_code: int, conditions: tuple[str, ...] = ()) -> str:
    """What the Job controller does with a failed pod: the first matching podFailurePolicy rule, else Count."""
    for rule in job["spec"].get("podFailurePolicy", {}).get("rules", []):
        codes = rule.get("onExitCodes")
        if codes and codes.get("containerName", container) == container:
            hit = exit_code in codes["values"]
            if hit == (codes["operator"] == "In"):
                return rule["action"]
        for cond in rule.get("onPodConditions", []):
            if cond["type"] in conditions and cond.get("status", "True") == "True":
                return rule["action"]
    return "Count"


def descendants(pid: int) -> list[int]:
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        kids = subprocess.run(["pgrep", "-P", str(p)], capture_output=True, text=True).stdout.split()
        out += [int(k) for k in kids]
        todo += [int(k) for k in kids]
    return out


def kill(proc: subprocess.Popen) -> None:
    """A pod deleted or its node lost: every process in the container dies at once (torchrun starts its
    workers in sessions of their own, so a process-group kill would miss them)."""
    for pid in [proc.pid, *descendants(proc.pid)]:
        try:
            os.kill(pid, 9)
        except ProcessLookupError:
            pass
    proc.wait()


def terminate(proc: subprocess.Popen) -> None:
    """What the kubelet does first on a pod's deletion or a drain: SIGTERM to the container's main process."""
    os.kill(proc.pid, 15)

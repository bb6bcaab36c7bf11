"""Kubernetes without a cluster: every manifest against the schemas of Kubernetes 1.31 to 1.37 (strict), the Kustomize bases against the
code that renders them, and the rendered pods run for real as local processes (training with a killed node and a
SIGTERM, the MLflow server with authentication)."""

from __future__ import annotations

import base64
import copy
import json
import os
import shutil
import signal
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path

import functools

import jsonschema
import kubernetes_validate
import pytest
import referencing
import yaml
from needs import missing
from pods import Pod, failure_action, kill, terminate
from ports import free_port
from sample_data import run_cli, training_dataset

from launchers import node
from launchers.k8s import kustomize, manifests

ROOT = Path(__file__).resolve().parents[1]
K8S = ROOT / "k8s"
TINY = ROOT / "configs" / "dae" / "tiny.yaml"
# The Kubernetes minor versions every manifest must be valid for (docs/kubernetes.md, "Supported Kubernetes versions").
SUPPORTED = ("1.31", "1.32", "1.33", "1.34", "1.35", "1.36", "1.37")
SCHEMAS = Path(kubernetes_validate.__file__).parent / "kubernetes-json-schema"
KUSTOMIZE = shutil.which("kustomize") or shutil.which("kubectl")


def kustomize_build(d: Path) -> subprocess.CompletedProcess:
    if KUSTOMIZE is None:
        missing("kustomize or kubectl (to build the Kustomize overlays)",
                "install kubectl (it builds overlays with `kubectl kustomize`) or kustomize, and put it on PATH")
    cmd = [KUSTOMIZE, "kustomize", str(d)] if KUSTOMIZE.endswith("kubectl") else [KUSTOMIZE, "build", str(d)]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=60)


# -- validation ----------------------------------------------------------------------------------

def _structural(schema):
    """A CRD schema as JSON Schema with the API server's strict field validation: fields a schema does not list are errors."""
    if isinstance(schema, list):
        return [_structural(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: _structural(v) for k, v in schema.items() if not k.startswith("x-kubernetes-")}
    if "properties" in schema and not schema.get("x-kubernetes-preserve-unknown-fields"):
        out["additionalProperties"] = False
    return out


PYTORCHJOB_SCHEMA = _structural(yaml.safe_load((K8S / "crds" / "pytorchjob.yaml").read_text())["spec"]["versions"][0]["schema"]["openAPIV3Schema"])


@functools.cache
def _registry(version: str) -> referencing.Registry:
    """The shared definitions of one Kubernetes version, strict (unknown fields are errors), read once per test process."""
    defs = json.loads((SCHEMAS / f"v{version}.0-local-strict" / "_definitions.json").read_text())
    return referencing.Resource.from_contents(defs) @ referencing.Registry()


@functools.cache
def _validator(version: str, api_version: str, kind: str) -> jsonschema.Draft202012Validator:
    group = api_version.split("/")[0].split(".")[0] + "-" + api_version.split("/")[1] if "/" in api_version else api_version
    schema = json.loads((SCHEMAS / f"v{version}.0-local-strict" / f"{kind.lower()}-{group}.json").read_text())
    return jsonschema.Draft202012Validator(schema, registry=_registry(version))


def _core_objects(obj: dict) -> list[dict]:
    """What Kubernetes' own schemas check: the object, or for a PyTorchJob the pod template of each replica."""
    if obj["kind"] != "PyTorchJob":
        return [obj]
    return [{"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": "x"}, "template": r["template"]}
            for r in obj["spec"]["pytorchReplicaSpecs"].values()]


def validate(obj: dict, versions: tuple[str, ...] = SUPPORTED) -> None:
    """Raises unless ``obj`` is valid (strict) for every Kubernetes minor version in ``versions``; the message names the
    versions that refuse it. A PyTorchJob is checked against our CRD and its pod templates against the core schemas."""
    if obj["kind"] == "PyTorchJob":
        jsonschema.validate(obj, PYTORCHJOB_SCHEMA)
    refused = {}
    for version in versions:
        for core in _core_objects(obj):
            error = jsonschema.exceptions.best_match(_validator(version, core["apiVersion"], core["kind"]).iter_errors(core))
            if error is not None:
                refused[version] = f"{'.'.join(map(str, error.absolute_path))}: {error.message}"
                break
    if refused:
        name = f"{obj['kind']}/{obj['metadata'].get('name')}"
        reasons: dict[str, list[str]] = {}
        for version, why in refused.items():
            reasons.setdefault(why, []).append(version)
        raise AssertionError(f"{name} is refused by Kubernetes {', '.join(refused)} (valid on: "
                             f"{', '.join(v for v in versions if v not in refused) or 'none'}): "
                             + "; ".join(f"[{', '.join(vs)}] {why}" for why, vs in reasons.items()))


def _render(tmp_path: Path, *args: str) -> list[dict]:
    out = tmp_path / "rendered"
    shutil.rmtree(out, ignore_errors=True)
    res = run_cli("launch", *args, "--image", "registry.example/medssl:1", "--render", str(out))
    assert "apply with: kubectl apply -f" in res.stdout
    (path,) = out.glob("*.yaml")
    return list(yaml.safe_load_all(path.read_text()))


@pytest.mark.parametrize("flavor,nodes,gpus", [("job", 4, 8), ("job", 1, 0), ("pytorchjob", 3, 8), ("pytorchjob", 1, 1)])
def test_rendered_training_jobs_are_valid_kubernetes(tmp_path, flavor, nodes, gpus):
    objs = _render(tmp_path, "k8s", "--config", str(ROOT / "configs" / "dae" / "base.yaml"), "--nodes", str(nodes), "--gpus-per-node",
                   str(gpus), "--flavor", flavor, "--namespace", "imaging")
    for obj in objs:
        validate(obj)
        assert obj["metadata"]["namespace"] == "imaging"
    kinds = [o["kind"] for o in objs]
    assert kinds == (["ServiceAccount", "ConfigMap", "Service", "Job"] if flavor == "job" else ["ServiceAccount", "ConfigMap", "PyTorchJob"])
    job = objs[-1]
    config = yaml.safe_load(objs[1]["data"]["config.yaml"])
    assert config["data"]["dataset"] == "/datasets/ct-mr" and config["workdir"] == "/runs"  # the cluster's volumes
    pods = [r["template"]["spec"] for r in job["spec"]["pytorchReplicaSpecs"].values()] if flavor == "pytorchjob" else [job["spec"]["template"]["spec"]]
    for spec in pods:
        c = spec["containers"][0]
        assert spec["securityContext"]["runAsNonRoot"] and not spec["automountServiceAccountToken"]
        assert c["securityContext"]["readOnlyRootFilesystem"] and c["securityContext"]["capabilities"] == {"drop": ["ALL"]}
        assert all("value" not in e for e in c["env"] if "PASSWORD" in e["name"] or "USERNAME" in e["name"])  # from the Secret only
        assert (c["resources"]["limits"].get("nvidia.com/gpu") or 0) == gpus
        assert {"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": "32Gi"}} in spec["volumes"]
        assert spec["terminationGracePeriodSeconds"] >= 300
    if flavor == "job":
        assert job["spec"]["completionMode"] == "Indexed" and job["spec"]["completions"] == nodes == job["spec"]["parallelism"]
        assert job["spec"]["backoffLimitPerIndex"] == 6 and job["spec"]["maxFailedIndexes"] == 0  # a lost node costs each index one
        assert failure_action(job, "train", 2) == "FailJob" and failure_action(job, "train", 137) == "Count"
        assert failure_action(job, "train", 137, ("DisruptionTarget",)) == "Ignore"  # pre-emption does not use up retries
    else:
        replicas = job["spec"]["pytorchReplicaSpecs"]
        assert replicas["Master"]["replicas"] == 1 and replicas.get("Worker", {}).get("replicas", 0) == nodes - 1


def test_rendered_ingest_jobs_are_valid_kubernetes(tmp_path):
    objs = _render(tmp_path, "k8s-ingest", "site-a/ct", "site-b", "--dataset", "ct-2026", "--partitions", "8", "--ingest-arg=--spacing=1.5")
    for obj in objs:
        validate(obj)
    sa, parts, fin = objs
    assert parts["spec"]["completions"] == 8 and "--partition" in parts["spec"]["template"]["spec"]["containers"][0]["args"]
    assert fin["spec"]["template"]["spec"]["containers"][0]["args"][:6] == ["medssl", "ingest", "--out", "/datasets/ct-2026", "--finalize", "8"]
    assert "--spacing=1.5" in parts["spec"]["template"]["spec"]["containers"][0]["args"]


def test_the_validator_fails_on_what_a_cluster_would_refuse():
    job = manifests.pytorch_job(manifests.Train(name="x"), manifests.Cluster())
    bad = copy.deepcopy(job)
    bad["spec"]["pytorchReplicaSpecs"]["Master"]["restartPolcy"] = "OnFailure"  # a typo
    with pytest.raises(jsonschema.ValidationError):
        validate(bad)
    bad = copy.deepcopy(job)
    bad["spec"]["pytorchReplicaSpecs"]["Master"]["template"]["spec"]["containers"][0]["imagePullPolice"] = "Always"
    with pytest.raises(AssertionError, match="'imagePullPolice' was unexpected"):
        validate(bad)
    plain = manifests.train_job(manifests.Train(name="x"), manifests.Cluster())
    plain["spec"]["parallelism"] = "all"  # not an integer
    with pytest.raises(AssertionError, match=r"refused by Kubernetes 1.31, 1.32, 1.33, 1.34, 1.35, 1.36, 1.37 \(valid on: none\)"):
        validate(plain)


def test_the_schemas_of_every_supported_kubernetes_version_are_installed():
    installed = {kubernetes_validate.utils.major_minor(v) for v in kubernetes_validate.utils.all_versions()}
    assert set(SUPPORTED) <= installed, f"kubernetes-validate lacks {sorted(set(SUPPORTED) - installed)}: pip install 'kubernetes-validate>=1.37'"
    doc = (ROOT / "docs" / "kubernetes.md").read_text()
    assert f"Kubernetes {SUPPORTED[0]} to {SUPPORTED[-1]}" in doc  # the docs state the versions the tests check


@pytest.mark.parametrize("version", SUPPORTED)
def test_the_failure_policy_is_valid_on_each_supported_version(version):
    """Before 1.35 a pod-condition rule must say its status; the rendered policy must pass, the policy without it must
    fail exactly on 1.31-1.34: the check really is per version."""
    jobs = [manifests.train_job(manifests.Train(name="x"), manifests.Cluster()),
            *manifests.ingest_jobs(manifests.Ingest(name="i", dataset="d"), manifests.Cluster())[1:]]
    for job in jobs:
        validate(job, (version,))
        rule = next(r for r in job["spec"]["podFailurePolicy"]["rules"] if "onPodConditions" in r)
        assert rule["onPodConditions"] == [{"type": "DisruptionTarget", "status": "True"}]
        old = copy.deepcopy(job)
        del next(r for r in old["spec"]["podFailurePolicy"]["rules"] if "onPodConditions" in r)["onPodConditions"][0]["status"]
        if version < "1.35":
            with pytest.raises(AssertionError, match=f"refused by Kubernetes {version} .*status' is a required property"):
                validate(old, (version,))
        else:
            validate(old, (version,))


def test_the_kustomize_bases_are_what_the_code_renders():
    assert kustomize.main([str(K8S), "--check"]) == 0
    files = kustomize.files()
    files["train/base/job.yaml"] += "# edited by hand\n"
    assert files != kustomize.files()  # a hand edit would be noticed


def test_every_kustomization_builds_and_validates(tmp_path):
    dirs = sorted(p.parent for p in K8S.rglob("kustomization.yaml"))
    built = {}
    for d in dirs:
        res = kustomize_build(d)
        assert res.returncode == 0, f"{d}: {res.stderr}"
        objs = [o for o in yaml.safe_load_all(res.stdout) if o]
        for obj in objs:
            validate(obj)
        built[d.relative_to(K8S).as_posix()] = objs
    assert {"train/base", "train/overlays/pytorchjob", "ingest/base", "mlflow/base", "mlflow/overlays/dev", "mlflow/overlays/production",
            "cluster"} <= built.keys()
    assert [o["kind"] for o in built["train/overlays/pytorchjob"]] == ["ServiceAccount", "ConfigMap", "PyTorchJob"]
    prod = next(o for o in built["mlflow/overlays/production"] if o["kind"] == "Deployment")
    env = {e["name"]: e for e in prod["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert "secretKeyRef" in env["MLFLOW_BACKEND_STORE_URI"]["valueFrom"] and "secretKeyRef" in env["AWS_SECRET_ACCESS_KEY"]["valueFrom"]
    for objs in built.values():  # no credential is ever written into a manifest
        text = yaml.safe_dump_all(objs).lower()
        assert "password:" not in text.replace("mlflow_auth_admin_password", "") and "postgresql://" not in text


def test_a_bad_config_is_refused_before_anything_is_rendered_or_submitted(tmp_path):
    res = run_cli("launch", "k8s", "--config", str(TINY), "--image", "x", "--render", str(tmp_path / "r"), "optim.lr=-1", check=False)
    assert res.returncode == 2 and "optim.lr" in res.stderr and not (tmp_path / "r").exists()


def test_the_image_runs_what_the_manifests_expect():
    """The Dockerfile cannot be built here (no container engine): check it agrees with the manifests."""
    text = (ROOT / "Dockerfile").read_text()
    spec = manifests.train_job(manifests.Train(name="x"), manifests.Cluster())["spec"]["template"]["spec"]
    assert f"USER {spec['securityContext']['runAsUser']}:{spec['securityContext']['runAsGroup']}" in text
    assert 'ENTRYPOINT ["/usr/bin/tini", "--"]' in text and "command" not in spec["containers"][0]  # args run under tini
    assert "HOME=/tmp" in text and '".[server]"' in text and "--constraint" in text
    for package in ("medssl_scale", "ingest", "launchers"):
        assert f"COPY {package} {package}" in text


def test_submit_without_a_cluster_says_so(tmp_path):
    res = run_cli("launch", "k8s", "--config", str(TINY), "--image", "x", "--submit", "--nodes", "1", "--gpus-per-node", "0", check=False,
                  env={"KUBECONFIG": str(tmp_path / "none"), "KUBERNETES_SERVICE_HOST": ""})
    assert res.returncode == 2 and "no Kubernetes cluster configured" in res.stderr


# -- the pod entry ---------------------------------------------------------------------------------

def test_the_node_entry_reads_each_flavours_environment():
    indexed = {"MEDSSL_NNODES": "4", "MEDSSL_NPROC_PER_NODE": "8", "MEDSSL_NODE_RANK": "3", "MEDSSL_MASTER_ADDR": "j-0.j", "MEDSSL_MASTER_PORT": "29500"}
    args = node.torchrun_args({**indexed, "MEDSSL_SHUTDOWN_TIMEOUT": "570"}, ["--config", "c.yaml"])
    assert args[:7] == ["--nnodes=4", "--node-rank=3", "--nproc-per-node=8", "--master-addr=j-0.j", "--master-port=29500", "--max-restarts=0",
                        "--shutdown-timeout=570"]
    assert args[-4:] == ["-m", "launchers.rank", "--config", "c.yaml"]
    operator = {"MEDSSL_NNODES": "2", "RANK": "1", "MASTER_ADDR": "x-master-0", "MASTER_PORT": "23456", "WORLD_SIZE": "2"}
    assert node.torchrun_args(operator, [])[:5] == ["--nnodes=2", "--node-rank=1", "--nproc-per-node=1", "--master-addr=x-master-0",
                                                     "--master-port=23456"]
    assert node.torchrun_args({**indexed, "MEDSSL_NODE_RANK": "", "JOB_COMPLETION_INDEX": "2"}, [])[1] == "--node-rank=2"
    for env, msg in (({**indexed, "MEDSSL_NODE_RANK": "4"}, "outside a job of 4"), ({"MEDSSL_NNODES": "2"}, "RANK"),
                     ({**indexed, "MEDSSL_NNODES": "two"}, "not an integer")):
        with pytest.raises(node.NodeEnvError, match=msg):
            node.torchrun_args(env, [])


# -- simulated pods --------------------------------------------------------------------------------

SECRETS = {("medssl-mlflow-client", "username"): "trainer", ("medssl-mlflow-client", "password"): "s3cret"}


def _wait(pred, timeout: float, what: str, procs=()) -> None:
    deadline = time.time() + timeout
    while not pred():
        if time.time() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        for p in procs:
            if p.poll() is not None and p.returncode != 0:
                raise AssertionError(f"a pod exited {p.returncode} while waiting for {what}:\n{p.stdout.read()[-4000:]}")
        time.sleep(0.1)


def _complete_steps(run: Path) -> list[int]:
    ckpts = run / "checkpoints"
    return sorted(int(c.name.split("-")[1]) for c in ckpts.glob("step-*") if (c / "COMPLETE").exists()) if ckpts.exists() else []


@pytest.mark.slow
def test_simulated_pods_train_lose_a_node_restart_and_resume(tmp_path):
    """Two pods of the rendered Indexed Job as local processes: a pod is killed (node lost), the other fails by itself,
    the Job's policy restarts both, they resume; then SIGTERM (a drain) checkpoints, and a last restart finishes."""
    from mlflow_server import mlflow_server

    volumes = {"medssl-datasets": tmp_path / "datasets", "medssl-runs": tmp_path / "runs"}
    training_dataset(volumes["medssl-datasets"], n_patients=3, n_mr=1)  # -> datasets/dataset
    objs = _render(tmp_path, "k8s", "--config", str(TINY), "--nodes", "2", "--gpus-per-node", "0", "--cpu", "1", "--memory", "4Gi",
                   "--dataset", "dataset", "--name", "sim", "steps=40", "checkpoint.every=5", "tracking.plot_every=20",
                   "tracking.experiment=k8s-sim")
    config_map, job = objs[1], objs[-1]
    run = volumes["medssl-runs"] / "dae-tiny"
    rendezvous = free_port()
    with mlflow_server(tmp_path / "mlflow") as uri:
        hosts = {"sim-0.sim": "127.0.0.1", "medssl-mlflow:5000": uri.removeprefix("http://")}

        def pods():
            made = [Pod(job, tmp_path, i, volumes, {config_map["metadata"]["name"]: config_map["data"]}, SECRETS, hosts,
                        {"29500": str(rendezvous)}) for i in range(2)]
            return [p.start() for p in made]

        # 1. Node 1 is lost (SIGKILL to its whole pod) once a checkpoint exists.
        procs = pods()
        _wait(lambda: _complete_steps(run), 300, "a first checkpoint", procs)
        kill(procs[1])
        out0, _ = procs[0].communicate(timeout=240)  # the survivor must fail on its own, not hang
        assert procs[0].returncode not in (0, 2), out0
        assert failure_action(job, "train", procs[0].returncode) == "Count" and failure_action(job, "train", -procs[1].returncode + 128) == "Count"
        first = max(_complete_steps(run))
        assert first < 40

        # 2. The Job replaces both pods (same indices): they resume; a drain sends SIGTERM to both.
        procs = pods()
        _wait(lambda: max(_complete_steps(run)) > first, 300, "a checkpoint after the restart", procs)
        for p in procs:
            terminate(p)
        outs = [p.communicate(timeout=240)[0] for p in procs]
        assert f"resumed from {run / 'checkpoints'}/step-{first:08d}" in outs[0]
        assert all(p.returncode != 0 for p in procs), outs  # not done: the Job must run them again
        drained = max(_complete_steps(run))
        assert drained > first and drained < 40, outs[0]
        metrics = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]
        assert metrics == list(range(1, drained + 1))  # the SIGTERM checkpoint is where the run stopped

        # 3. Last restart: finishes the run.
        procs = pods()
        outs = [p.communicate(timeout=300)[0] for p in procs]
        assert all(p.returncode == 0 for p in procs), outs
        assert f"resumed from {run / 'checkpoints'}/step-{drained:08d}" in outs[0] and "finished at step 40 (2 rank(s))" in outs[0]
        metrics = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]
        assert metrics == list(range(1, 41))  # every step once, across three lives

        import mlflow

        client = mlflow.MlflowClient(uri)
        (mlrun,) = client.search_runs([client.get_experiment_by_name("k8s-sim").experiment_id])
        assert mlrun.info.status == "FINISHED"  # one MLflow run across the restarts
        for name in ("loss", "lr"):  # every step exactly once across the three lives, not only the last
            assert sorted(m.step for m in client.get_metric_history(mlrun.info.run_id, name)) == list(range(1, 41)), name


def test_a_pod_with_a_bad_config_or_no_dataset_fails_the_job_instead_of_retrying(tmp_path):
    objs = _render(tmp_path, "k8s", "--config", str(TINY), "--nodes", "2", "--gpus-per-node", "0", "--name", "bad")
    config_map, job = objs[1], objs[-1]
    broken = config_map["data"]["config.yaml"].replace("batch_size: 2", "batch_size: 0")  # edited in the cluster, say
    pod = Pod(job, tmp_path, 0, {"medssl-datasets": tmp_path / "d", "medssl-runs": tmp_path / "r"}, {"bad-config": {"config.yaml": broken}},
              SECRETS, {"bad-0.bad": "127.0.0.1"}, {"29500": str(free_port())})
    p = pod.start()
    out, _ = p.communicate(timeout=120)
    assert p.returncode == 2 and "data.batch_size" in out, out
    assert failure_action(job, "train", p.returncode) == "FailJob"
    pod = Pod(job, tmp_path, 1, {"medssl-datasets": tmp_path / "d", "medssl-runs": tmp_path / "r"},
              {"bad-config": config_map["data"]}, SECRETS, {"bad-0.bad": "127.0.0.1"}, {"29500": str(free_port())})
    p = pod.start()  # a good config, but no dataset on the volume: no retry can fix that either
    out, _ = p.communicate(timeout=120)
    assert p.returncode == 2 and "no dataset there" in out, out


def test_a_pod_whose_secret_is_missing_does_not_start(tmp_path):
    objs = _render(tmp_path, "k8s", "--config", str(TINY), "--nodes", "1", "--gpus-per-node", "0", "--name", "nosecret")
    with pytest.raises(KeyError, match="CreateContainerConfigError"):
        Pod(objs[-1], tmp_path, 0, {"medssl-datasets": tmp_path / "d", "medssl-runs": tmp_path / "r"},
            {"nosecret-config": objs[1]["data"]}, {}).env()


def test_the_dev_mlflow_server_runs_from_its_manifest_with_authentication(tmp_path):
    res = kustomize_build(K8S / "mlflow" / "overlays" / "dev")
    assert res.returncode == 0, res.stderr
    objs = [o for o in yaml.safe_load_all(res.stdout) if o]
    deploy = next(o for o in objs if o["kind"] == "Deployment")
    auth = next(o for o in objs if o["kind"] == "ConfigMap")
    port = free_port()
    secrets = {("medssl-mlflow-admin", "username"): "admin", ("medssl-mlflow-admin", "password"): "a-long-admin-password",
               ("medssl-mlflow-admin", "flask-secret-key"): "0123456789abcdef"}
    pod = Pod(deploy, tmp_path, 0, {"medssl-mlflow-data": tmp_path / "pvc"}, {auth["metadata"]["name"]: auth["data"]}, secrets)
    words = pod.command()
    words[words.index("--port") + 1] = str(port)
    words[words.index("--host") + 1] = "127.0.0.1"
    words[words.index("--workers") + 1] = "1"
    env = {"PATH": os.environ["PATH"], **pod.env()}
    server = subprocess.Popen(words, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    base = f"http://127.0.0.1:{port}"

    def get(path: str, user: str | None = None, password: str = "", host: str | None = None) -> int:
        req = urllib.request.Request(base + path)
        if user:
            req.add_header("Authorization", "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode())
        if host:
            req.add_header("Host", host)
        try:
            with urllib.request.urlopen(req, timeout=60) as r:  # a loaded CI machine; PBKDF2 checks are slow
                return r.status
        except urllib.error.HTTPError as e:
            return e.code

    try:
        def up() -> bool:
            try:
                return get("/health") == 200
            except OSError:
                if server.poll() is not None:
                    raise AssertionError(server.stdout.read()[-3000:]) from None
                return False

        _wait(up, 120, "the MLflow server's /health")  # what the readiness probe asks, without credentials
        api = "/api/2.0/mlflow/experiments/search?max_results=1"
        assert get(api) == 401  # authentication is on
        assert get(api, "admin", "wrong") == 401
        assert get(api, "admin", "a-long-admin-password") == 200  # the admin from the Secret
        assert get(api, "admin", "a-long-admin-password", host="medssl-mlflow:5000") == 200  # the Service's name is an allowed host
        assert get(api, "admin", "a-long-admin-password", host="medssl-mlflow.medssl.svc.cluster.local:5000") == 200
        for host in ("evil.example", "medssl-mlflow.evil.example"):  # DNS rebinding: refused whatever the credentials
            assert get(api, "admin", "a-long-admin-password", host=host) != 200
        assert (tmp_path / "pvc" / "mlflow.db").exists() and (tmp_path / "pvc" / "auth.db").exists()  # both stores on the volume
    finally:
        if server.poll() is None:
            os.killpg(server.pid, signal.SIGTERM)
            server.wait(timeout=30)

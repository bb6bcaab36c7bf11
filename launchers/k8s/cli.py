"""``medssl launch k8s`` (pre-training) and ``medssl launch k8s-ingest`` (a partitioned ingest)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from launchers.k8s import manifests as m


def _cluster_args(p: argparse.ArgumentParser) -> None:
    d = m.Cluster()
    p.add_argument("--image", required=True, help="the medssl-scale image the pods run (see Dockerfile)")
    p.add_argument("--namespace", default=d.namespace)
    p.add_argument("--datasets-claim", default=d.datasets_claim, help=f"PVC of dataset directories (default {d.datasets_claim})")
    p.add_argument("--service-account", default=d.service_account)
    p.add_argument("--image-pull-secret")
    out = p.add_mutually_exclusive_group(required=True)
    out.add_argument("--render", type=Path, metavar="DIR", help="write the manifests to DIR (kubectl apply -f DIR)")
    out.add_argument("--submit", action="store_true", help="apply them to the current cluster and follow the job")
    p.add_argument("--no-follow", action="store_true", help="with --submit: return once applied")


def add_parsers(where: argparse._SubParsersAction) -> None:
    from medssl_scale.train.cli import config_arguments

    d, t = m.Cluster(), m.Train(name="x")
    k8s = where.add_parser("k8s", help="a multi-node pre-training job on Kubernetes (Indexed Job or PyTorchJob)",
                           description="Render (--render DIR) or submit (--submit) a multi-node pre-training job. The run config "
                           "is validated here and travels as a ConfigMap; pods run `python -m launchers.node`.")
    k8s.add_argument("--nodes", type=int, default=t.nodes)
    k8s.add_argument("--gpus-per-node", type=int, default=t.gpus_per_node, help="0: CPU pods (gloo)")
    k8s.add_argument("--nproc-per-node", type=int, help="ranks per pod (default: one per GPU)")
    k8s.add_argument("--flavor", choices=("job", "pytorchjob"), default="job",
                     help="job: an Indexed Job, no operator needed; pytorchjob: the Kubeflow Training Operator")
    k8s.add_argument("--name", help="job name (default: the run name)")
    k8s.add_argument("--dataset", help="dataset directory on the datasets volume (default: the last part of data.dataset)")
    k8s.add_argument("--runs-claim", default=d.runs_claim, help="ReadWriteMany PVC for runs and checkpoints")
    k8s.add_argument("--mlflow-uri", default=d.mlflow_uri)
    k8s.add_argument("--mlflow-secret", default=d.mlflow_secret, help="Secret with keys username and password")
    k8s.add_argument("--cpu", default=t.cpu)
    k8s.add_argument("--memory", default=t.memory)
    k8s.add_argument("--shm", default=t.shm)
    k8s.add_argument("--grace", type=int, default=t.grace_s, help="seconds from SIGTERM to SIGKILL (the checkpoint must fit)")
    k8s.add_argument("--retries-per-node", type=int, default=t.retries_per_node,
                     help="failures each node may have (pre-emptions not counted) before the job gives up")
    _cluster_args(k8s)
    config_arguments(k8s)  # pods always resume (--resume auto) and log without a progress bar
    k8s.set_defaults(func=_train)

    ing = where.add_parser("k8s-ingest", help="a partitioned ingest on Kubernetes (Indexed Job + finalize Job)")
    ing.add_argument("sources", nargs="+", metavar="SRC", help="paths under the sources volume")
    ing.add_argument("--dataset", required=True, help="dataset directory on the datasets volume")
    ing.add_argument("--partitions", type=int, default=4)
    ing.add_argument("--workers", type=int, default=4, help="processes per partition pod")
    ing.add_argument("--name", help="job name (default: ingest-<dataset>)")
    ing.add_argument("--sources-claim", default=d.sources_claim)
    ing.add_argument("--site-secret", default=d.site_secret, help="Secret with key secret: the HMAC key of the pseudonyms")
    i = m.Ingest(name="x", dataset="x")
    ing.add_argument("--cpu", default=i.cpu, help="per partition pod")
    ing.add_argument("--memory", default=i.memory, help="per pod; the finalize pod holds every manifest record")
    ing.add_argument("--ingest-arg", action="append", default=[], metavar="ARG", help="more `medssl ingest` options, e.g. --ingest-arg=--spacing=1.5")
    _cluster_args(ing)
    ing.set_defaults(func=_ingest)


def _cluster(args: argparse.Namespace, **extra: str) -> m.Cluster:
    return m.Cluster(namespace=args.namespace, image=args.image, datasets_claim=args.datasets_claim,
                     service_account=args.service_account, image_pull_secret=args.image_pull_secret, **extra)


def _train(args: argparse.Namespace) -> int:
    from launchers.k8s import render

    cluster = _cluster(args, runs_claim=args.runs_claim, mlflow_uri=args.mlflow_uri, mlflow_secret=args.mlflow_secret)
    try:
        config_yaml, run_name = render.pod_config(args.config, args.overrides, args.dataset)
        spec = m.Train(name=m.dns_name(args.name or run_name), nodes=args.nodes, gpus_per_node=args.gpus_per_node,
                       nproc_per_node=args.nproc_per_node, cpu=args.cpu, memory=args.memory, shm=args.shm, grace_s=args.grace,
                       retries_per_node=args.retries_per_node, flavor=args.flavor)
        objs = m.training(spec, cluster, config_yaml)
    except (ValueError, FileNotFoundError) as e:
        print(f"medssl launch k8s: {e}", file=sys.stderr)
        return 2
    job = objs[-1]
    return _emit(args, objs, job["metadata"]["name"], job["metadata"]["name"], job["kind"])


def _ingest(args: argparse.Namespace) -> int:
    cluster = _cluster(args, sources_claim=args.sources_claim, site_secret=args.site_secret)
    try:
        spec = m.Ingest(name=m.dns_name(args.name or f"ingest-{args.dataset}", 40), dataset=args.dataset, sources=tuple(args.sources),
                        partitions=args.partitions, workers=args.workers, cpu=args.cpu, memory=args.memory,
                        extra_args=tuple(args.ingest_arg))
    except ValueError as e:
        print(f"medssl launch k8s-ingest: {e}", file=sys.stderr)
        return 2
    objs = m.ingest_jobs(spec, cluster)
    return _emit(args, objs, spec.name, f"{spec.name}-finalize", "Job", first=f"{spec.name}-parts")


def _emit(args: argparse.Namespace, objs: list[dict], name: str, job: str, kind: str, first: str | None = None) -> int:
    """Write or submit ``objs``; ``job`` decides success; ``first``: a Job it waits on (an ingest's parts), deleted if that fails."""
    from launchers.k8s import render, submit

    if args.render:
        path = render.write(objs, args.render, name)
        print(f"wrote {len(objs)} objects to {path}; apply with: kubectl apply -f {args.render}")
        return 0
    try:
        submit.apply(objs)
        if args.no_follow:
            print(f"submitted; follow with: kubectl -n {args.namespace} get {kind.lower()}/{job} -w")
            return 0
        selector = f"app.kubernetes.io/instance={name}"
        if first and submit.follow(args.namespace, first, "Job", selector) == 1:
            submit.delete_job(args.namespace, job)  # else it would wait for parts that will not come
            print(f"{first} failed: deleted {job}; the parts' logs say why", file=sys.stderr)
            return 1
        return submit.follow(args.namespace, job, kind, selector)
    except submit.ClusterError as e:
        print(f"medssl launch: {e}", file=sys.stderr)
        return 2

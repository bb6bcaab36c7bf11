"""Kubernetes: the manifests of a training or ingest job, built as data (:mod:`.manifests`), and their submission (:mod:`.submit`).

``k8s/`` holds the same manifests as Kustomize bases and overlays for teams
that keep their cluster state in Git; they are rendered from :mod:`.manifests`
(``make k8s``) and a test keeps the two equal.
"""

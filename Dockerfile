# The image the Kubernetes manifests run (k8s/): training pods, ingest pods and the MLflow server.
#   docker build -t REGISTRY/medssl-scale:0.1.0 .
#   docker build --build-arg TORCH_INDEX=https://download.pytorch.org/whl/cpu -t REGISTRY/medssl-scale:0.1.0-cpu .
# PyTorch's CUDA wheels carry the CUDA runtime; the node's driver comes in through the NVIDIA container toolkit.
ARG PYTHON=3.11

FROM python:${PYTHON}-slim-bookworm AS build
ARG TORCH=2.13.0
ARG TORCH_INDEX=https://download.pytorch.org/whl/cu128
# g++: DeepSpeed builds its CPU communication op on first use (CPU pods, gloo); nothing else is compiled.
RUN apt-get update && apt-get install -y --no-install-recommends g++ && rm -rf /var/lib/apt/lists/*
RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH PIP_NO_CACHE_DIR=1
RUN pip install --index-url ${TORCH_INDEX} torch==${TORCH} \
    && echo "torch==${TORCH}" > /opt/venv/constraints.txt
WORKDIR /src
COPY pyproject.toml README.md ./
COPY medssl_scale medssl_scale
COPY ingest ingest
COPY launchers launchers
# The constraint keeps the torch chosen above: no dependency may swap it for another build.
RUN pip install --constraint /opt/venv/constraints.txt ".[server]"

FROM python:${PYTHON}-slim-bookworm
RUN apt-get update && apt-get install -y --no-install-recommends g++ tini && rm -rf /var/lib/apt/lists/* \
    && groupadd --gid 1000 medssl && useradd --uid 1000 --gid 1000 --home-dir /tmp --no-create-home medssl
COPY --from=build /opt/venv /opt/venv
COPY configs /app/configs
ENV PATH=/opt/venv/bin:$PATH PYTHONUNBUFFERED=1 HOME=/tmp
WORKDIR /app
# The manifests run pods as 1000:1000 with a read-only root filesystem; /tmp is an emptyDir there.
USER 1000:1000
# tini as PID 1 reaps what exits and passes SIGTERM on; in the pods the command is `python -m launchers.node`,
# which execs torchrun, so the kubelet's SIGTERM reaches the ranks and they checkpoint.
ENTRYPOINT ["/usr/bin/tini", "--"]
CMD ["medssl", "--help"]

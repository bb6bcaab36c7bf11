# Two entry points for a fresh machine; each builds .venv when it is missing.
#   make demo   the main job end to end on embedded defaults (CPU, local files)
#   make test   the test suite (what CI runs through .ci/run)
VENV    ?= .venv
PY      := $(VENV)/bin/python
WORKDIR ?= demo-work
PYTEST_ARGS ?=

.PHONY: demo test bench venv clean k8s gpu-wheels gpu-check gpu-check-dry

venv: $(VENV)/.installed

# torch is pinned through a pip.conf inside the venv, so no later `pip install`
# in this environment can swap the local CPU wheel for a multi-GB CUDA build.
$(VENV)/.installed: pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	echo "torch==2.13.0" > $(VENV)/constraints.txt
	printf '[install]\nconstraint = %s\n' "$(abspath $(VENV))/constraints.txt" > $(VENV)/pip.conf
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[dev]'
	$(PY) -c "import torch; assert torch.__version__.startswith('2.13.0'), torch.__version__"
	touch $@

demo: venv
	$(VENV)/bin/medssl demo --workdir $(WORKDIR)

test: venv
	$(VENV)/bin/python -m pytest -n 2 $(PYTEST_ARGS)

# Rewrite the generated Kustomize bases (k8s/train, k8s/ingest) from launchers/k8s/manifests.py.
k8s: venv
	$(PY) -m launchers.k8s.kustomize k8s

bench: venv
	$(PY) bench/ingest.py

# The GPU check (bench/gpu/check.py). On a CPU machine: the wheels a GPU machine with only PyTorch and
# Triton lacks (.gpu-wheels/, for its Python 3.12). On the GPU machine, with the repository and those
# wheels: every GPU step in one command, results under gpu-check/ (GPU_PYTHON: the one that has torch).
GPU_PYTHON ?= python3
gpu-wheels: venv
	$(PY) bench/gpu/wheels.py --out .gpu-wheels

gpu-check:
	$(GPU_PYTHON) bench/gpu/check.py --out gpu-check

gpu-check-dry: venv
	$(PY) bench/gpu/check.py --dry-run --out gpu-check-dry

clean:
	rm -rf $(VENV) $(WORKDIR) .pytest_cache gpu-check gpu-check-dry

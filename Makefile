# The two commands a newcomer needs: `make quickstart` (train on the tiny model, end to end) and
# `make test`. `make install` sets up .venv first; both targets run it when needed.
PY := .venv/bin/python
PIP := .venv/bin/pip

.PHONY: install quickstart serve image test test-fast lint bench clean

.venv/.installed: pyproject.toml
	python3 -m venv .venv
	$(PIP) install -q --upgrade pip
	@# No NVIDIA GPU: take the CPU build of torch first (this machine kind keeps its wheel on
	@# disk); with a GPU, pip resolves torch from pyproject.toml and gets a CUDA build.
	if ! command -v nvidia-smi >/dev/null 2>&1; then $(PIP) install -q "torch==2.13.0"; fi
	$(PIP) install -q -e ".[test]"
	touch $@

install: .venv/.installed

quickstart: install
	.venv/bin/bentolora-models build-tiny
	.venv/bin/bentolora-models build-tiny-clip
	$(PY) -m train sample-data data/sample
	$(PY) -m train --config configs/quickstart.yaml

# Serve the tiny base and every adapter made for it (after `make quickstart`) on port 3000.
serve: install
	.venv/bin/bentolora-models build-tiny
	.venv/bin/bentolora-models build-tiny-clip
	BENTOLORA_BASE=sdxl-tiny BENTOLORA_CLIP=clip-tiny .venv/bin/bentoml serve service.service:SDXLLoRA

# The local CPU OCI image (root, buildah, debootstrap, skopeo; see deploy/README.md).
image: install
	bash deploy/build-image.sh

lint: install
	.venv/bin/ruff check .
	.venv/bin/ruff format --check .

test: install
	$(PY) -m pytest -q --durations=15

test-fast: install
	$(PY) -m pytest -q -m "not slow"

# Serving and training speed against plain diffusers (bench/RESULTS.md): the tiny model on a CPU,
# full-size SDXL on a GPU. Results in runs/bench/.
bench: install
	$(PY) -m bench.run --out runs/bench

clean:
	rm -rf .venv runs data .pytest_cache

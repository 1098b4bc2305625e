# The two commands a newcomer needs: `make quickstart` (train on the tiny model, end to end) and
# `make test`. `make install` sets up .venv first; both targets run it when needed.
PY := .venv/bin/python
PIP := .venv/bin/pip

LOCK := requirements/lock.txt
# Where the CPU build of torch comes from on a machine without an NVIDIA GPU: empty means pip's
# configured indexes (this project's CI machines keep the CPU wheel on disk); elsewhere
# `make install TORCH_INDEX=https://download.pytorch.org/whl/cpu`.
TORCH_INDEX ?=

.PHONY: install quickstart serve image test test-fast lint bench lock drift clean

# The locked set (requirements/lock.txt, tools/lock.py): exactly the versions the tests passed
# with. torch's pin has no local label, so with an NVIDIA GPU pip takes the CUDA build of that
# release from PyPI; without one, the CPU build is installed first.
.venv/.installed: pyproject.toml $(LOCK)
	python3 -m venv .venv
	$(PIP) install -q --upgrade pip
	if ! command -v nvidia-smi >/dev/null 2>&1; then \
	  $(PIP) install -q -c $(LOCK) $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX)) torch; fi
	$(PIP) install -q -c $(LOCK) -e ".[test]"
	$(PY) tools/lock.py check
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

# tools/system-deps.sh first: the Debian packages the browser and image tests need (installed
# when root, else named in one line and those tests skip).
test: install
	@bash tools/system-deps.sh
	$(PY) -m pytest -q --durations=15

test-fast: install
	$(PY) -m pytest -q -m "not slow"

# Serving and training speed against plain diffusers (bench/RESULTS.md): the tiny model on a CPU,
# full-size SDXL on a GPU. Results in runs/bench/.
bench: install
	$(PY) -m bench.run --out runs/bench

# Move the lock forward on purpose: the newest versions pyproject.toml allows, in a fresh venv;
# the lock is rewritten only if the whole suite passes there, and the changes are printed.
lock:
	python3 tools/lock.py refresh

# The early warning (not in CI, which stays reproducible): the newest allowed versions and the
# fast tests, the lock untouched. Run it weekly, or before a release.
drift:
	python3 tools/lock.py drift

clean:
	rm -rf .venv .venv-refresh .venv-drift runs data .pytest_cache

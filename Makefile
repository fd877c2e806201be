# Two entry points for a fresh machine: `make demo` and `make test`.
# Both create .venv and install everything the project needs into it.

PYTHON ?= python3
TORCH_INDEX ?=
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: demo test lint typecheck unit bench clean postgres

$(STAMP): pyproject.toml export/pyproject.toml federated/pyproject.toml requirements-dev.txt \
		federated/requirements-flower.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	# torch first and pinned. Where pip's index serves torch's CPU build (a local
	# mirror) that is what it gets; elsewhere plain PyPI serves the CUDA build (several GB):
	# `make TORCH_INDEX=https://download.pytorch.org/whl/cpu demo` takes the CPU wheel instead.
	$(BIN)/pip install --quiet torch==2.13.0 $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX))
	$(BIN)/pip install --quiet -e '.[cli,plots]' -e ./export -e './federated[postgres]' -r requirements-dev.txt
	# Flower for the scale-out tests: pinned, without resolving (docs/flower.md says why).
	$(BIN)/pip install --quiet --no-deps -r federated/requirements-flower.txt
	touch $(STAMP)

# The coordinator's tests also run against a real PostgreSQL server, which they start
# themselves from Debian's package; install it when it is missing and we may.
postgres:
	@if ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || command -v initdb >/dev/null; then :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql >/dev/null; \
	else echo "PostgreSQL not installed: its coordinator tests will be skipped"; fi

demo: $(STAMP)
	HF_HUB_OFFLINE=1 $(BIN)/python examples/desktop_app.py

test: $(STAMP) postgres lint typecheck unit

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

typecheck: $(STAMP)
	$(BIN)/mypy edgeperso export/edgeperso_export federated/edgeperso_federated examples benchmarks

unit: $(STAMP)
	HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 $(BIN)/python -m pytest -q

bench: $(STAMP)
	HF_HUB_OFFLINE=1 $(BIN)/python benchmarks/bench_export.py
	$(BIN)/python benchmarks/bench_store.py
	$(BIN)/python benchmarks/bench_federated.py

clean:
	rm -rf $(VENV) build dist *.egg-info

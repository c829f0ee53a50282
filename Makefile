# The README's contract: `make run` serves, `make test` passes, `make bench` measures.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
PROTO_SRC := $(wildcard protos/*.proto)
PROTO_OUT := $(PROTO_SRC:.proto=_pb2.py)
MODEL_DIR := models/smollm2-135m-instruct
MODEL := $(MODEL_DIR)/config.json

.PHONY: run test bench protos model lint clean

run: $(STAMP) $(PROTO_OUT) $(MODEL)
	$(PY) -m client serve --model $(MODEL_DIR) $(RUN_ARGS)

test: $(STAMP) $(PROTO_OUT) $(MODEL)
	$(PY) -m pytest -q

bench: $(STAMP) $(PROTO_OUT) $(MODEL)
	$(PY) -m client bench --model $(MODEL_DIR) $(BENCH_ARGS)

protos: $(PROTO_OUT)

model: $(MODEL)

lint: $(STAMP) $(PROTO_OUT)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/mypy

$(STAMP): pyproject.toml
	test -d $(VENV) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

protos/%_pb2.py: protos/%.proto $(STAMP)
	$(PY) -m grpc_tools.protoc -I . --python_out=. --grpc_python_out=. --pyi_out=. $(PROTO_SRC)

$(MODEL): $(STAMP)
	$(PY) -m worker.fetch_model --models-dir models

clean:
	rm -rf $(VENV) build *.egg-info protos/*_pb2*.py protos/*_pb2*.pyi

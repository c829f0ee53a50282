"""WorkerSettings: what a worker (or the in-process engine) can be told, by flags and CONVEYOR_* env."""

from pathlib import Path
from typing import Literal

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from protos.log_format import LogFormat
from protos.streams import model_id


class EngineSettings(BaseSettings):
    """The engine's knobs: the model, the KV pool and the scheduler's budgets."""

    model_config = SettingsConfigDict(
        env_prefix="CONVEYOR_", frozen=True, extra="ignore", cli_kebab_case=True, cli_implicit_flags=True
    )

    model: Path = Path("models/smollm2-135m-instruct")  # checkpoint directory or .gguf file
    model_name: str = ""  # id clients use; empty = the checkpoint's folder name
    device: Literal["auto", "cpu", "cuda"] = "auto"
    max_model_len: int | None = None  # default: the model's max_position_embeddings
    block_size: int = Field(16, ge=1)
    max_num_seqs: int = Field(64, ge=1)
    max_num_batched_tokens: int = Field(512, ge=1)  # token budget per step
    kv_cache_bytes: int | None = None  # default: 2 GiB on CPU, gpu_memory_fraction of free GPU memory
    gpu_memory_fraction: float = Field(0.8, gt=0, le=1)
    enable_prefix_caching: bool = True
    num_threads: int | None = None  # torch CPU threads; default: torch's choice
    cpu_decode_kernel: bool = True  # decode attention in the C kernel (else gather + SDPA)

    @property
    def served_model_name(self) -> str:
        return model_id(self.model, self.model_name)


class WorkerSettings(EngineSettings):
    """A serving worker: the engine plus Redis, identity and shutdown behaviour."""

    redis_url: str = "redis://127.0.0.1:6379/0"  # redis://user:password@host:port/db; rediss:// for TLS
    redis_ca_file: Path | None = None  # PEM; verifies a rediss:// server
    namespace: str = "conveyor"
    worker_id: str = ""  # default: hostname-pid; a random incarnation suffix is always added
    redis_timeout_s: float = Field(5.0, gt=0.5)  # bound on every Redis call (idle reads block 0.1 s)
    heartbeat_interval_s: float = Field(1.0, gt=0)
    heartbeat_ttl_s: float = Field(5.0, gt=0)  # silent this long: presumed dead, its jobs claimed
    claim_min_idle_ms: int = Field(1000, ge=1)  # a claimed job is not claimed again within this
    max_job_attempts: int = Field(3, ge=1)  # workers that may die holding a job before it is buried
    progress_ttl_s: float = Field(3600.0, gt=0)  # how long delivered tokens are kept for a resume
    drain_timeout_s: float = Field(30.0, ge=0)  # SIGTERM: finish running work for at most this long
    idle_block_ms: int = Field(100, ge=1)  # how long to block on Redis when there is nothing to run
    log_level: str = "INFO"
    log_format: LogFormat = "text"  # json: one object per line, with request and trace ids
    metrics_host: str = "127.0.0.1"  # where /metrics listens (0.0.0.0 in a pod)
    metrics_port: int = Field(9401, ge=-1)  # 0 = any free port, -1 = no /metrics
    health_host: str = "127.0.0.1"  # where grpc.health.v1 listens for probes (0.0.0.0 in a pod)
    health_port: int = Field(-1, ge=-1)  # 0 = any free port, -1 = no health server
    stall_timeout_s: float = Field(300.0, gt=0)  # liveness fails when one loop turn takes longer
    otlp_endpoint: str = ""  # e.g. http://otel-collector:4317: traces and metrics go there by OTLP/gRPC
    otlp_metrics_interval_s: float = Field(10.0, gt=0)  # how often metrics go out by OTLP
    # An embedding model (the kind is read from the checkpoint) runs a batcher instead of the scheduler:
    embed_max_batch_tokens: int = Field(16384, ge=1)  # padded tokens per batch: inputs x the longest
    embed_max_batch_size: int = Field(64, ge=1)  # inputs per batch (and calls held at once)
    embed_max_wait_ms: float = Field(5.0, ge=0)  # how long the oldest input waits for a batch to fill

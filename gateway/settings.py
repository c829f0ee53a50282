"""GatewaySettings: everything a gateway can be told, by flags and CONVEYOR_* env."""

from pathlib import Path

from pydantic import Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict

from protos.log_format import LogFormat
from protos.streams import model_id


class GatewaySettings(BaseSettings):
    """Where to listen, which Redis, which models' tokenizers, and the request limits."""

    model_config = SettingsConfigDict(
        env_prefix="CONVEYOR_", frozen=True, extra="ignore", cli_kebab_case=True, cli_implicit_flags=True
    )

    host: str = "127.0.0.1"
    port: int = Field(50051, ge=0, le=65535)  # 0 = any free port
    redis_url: str = "redis://127.0.0.1:6379/0"  # redis://user:password@host:port/db; rediss:// for TLS
    namespace: str = "conveyor"
    gateway_id: str = ""  # default: hostname-pid; a random incarnation suffix is always added
    model: Path = Path("models/smollm2-135m-instruct")  # checkpoint directory (tokenizer, config)
    model_name: str = ""  # id clients use; empty = the checkpoint's folder name
    # More checkpoints served beside it, each under its folder's name; the kind (generation or
    # embeddings) is read from each. The first of each kind is that kind's default.
    extra_models: list[Path] = []
    max_model_len: int | None = None  # default: the model's max_position_embeddings
    default_max_tokens: int = Field(256, ge=1)  # when a request leaves max_tokens at 0
    max_open_requests_per_stream: int = Field(1024, ge=1)
    # Beyond these, RESOURCE_EXHAUSTED at once with a retry hint:
    max_queued_jobs: int = Field(10_000, ge=1)  # jobs in the model's stream (queued or running)
    max_in_flight: int = Field(4096, ge=1)  # open generations on this gateway
    max_in_flight_per_caller: int = Field(0, ge=0)  # per caller (peer address); 0 = off
    requests_per_s_per_caller: float = Field(0.0, ge=0)  # per caller; 0 = off
    retry_after_ms: int = Field(1000, ge=1)  # the hint when capacity ran out
    tokenizer_threads: int = Field(4, ge=1)
    health_interval_s: float = Field(1.0, gt=0)  # also how often the heartbeat is renewed
    heartbeat_ttl_s: float = Field(5.0, gt=0)  # silent this long: workers drop this gateway's jobs
    redis_timeout_s: float = Field(5.0, gt=1)  # bound on every Redis call (blocking reads take 1 s)
    job_watch_interval_s: float = Field(5.0, gt=0)  # a quiet request checks its job exists this often
    max_redis_outage_s: float = Field(30.0, gt=0)  # a request waits out a Redis outage this long
    grace_s: float = Field(5.0, ge=0)  # SIGTERM: let open calls finish this long
    log_level: str = "INFO"
    log_format: LogFormat = "text"  # json: one object per line, with request and trace ids
    metrics_host: str = "127.0.0.1"  # where /metrics listens (0.0.0.0 in a pod)
    metrics_port: int = Field(9400, ge=-1)  # 0 = any free port, -1 = no /metrics
    otlp_endpoint: str = ""  # e.g. http://otel-collector:4317: traces and metrics go there by OTLP/gRPC
    otlp_metrics_interval_s: float = Field(10.0, gt=0)  # how often metrics go out by OTLP
    # Security. API keys: `name:key` or `name:key:model,model` entries, from a file (one per line)
    # and/or CONVEYOR_API_KEYS (separated by whitespace); none configured = open gateway.
    api_keys_file: Path | None = None
    api_keys: SecretStr = SecretStr("")
    tls_cert_file: Path | None = None  # PEM; with tls_key_file, the port speaks TLS
    tls_key_file: Path | None = None
    tls_client_ca_file: Path | None = None  # PEM; clients must present a certificate it signed
    redis_ca_file: Path | None = None  # PEM; verifies a rediss:// server

    @property
    def served_models(self) -> list[tuple[str, Path]]:
        """(id, checkpoint) of every model, the main one first."""
        return [(model_id(self.model, self.model_name), self.model)] + [
            (model_id(path, ""), path) for path in self.extra_models
        ]

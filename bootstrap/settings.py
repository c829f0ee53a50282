"""The settings groups that gateways and workers share, declared once: which Redis, how the process
reports itself (logs, metrics, traces), and which model. Each process's settings class inherits the
groups it needs and adds its own; every field is a flat flag and a `CONVEYOR_*` variable, and its
docstring is its `--help` text."""

from pathlib import Path

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from checkpoints import model_id
from telemetry.logs import LogFormat

SETTINGS_CONFIG = SettingsConfigDict(
    env_prefix="CONVEYOR_",
    frozen=True,
    extra="ignore",
    cli_kebab_case=True,
    cli_implicit_flags=True,
    use_attribute_docstrings=True,
)


class RedisSettings(BaseSettings):
    """Which Redis, and how this process shows in it."""

    model_config = SETTINGS_CONFIG

    redis_url: str = "redis://127.0.0.1:6379/0"
    """redis://user:password@host:port/db; rediss:// for TLS; redis+cluster://host:port (any node)
    for a Redis Cluster. Never logged."""
    redis_ca_file: Path | None = None
    """PEM file that verifies a rediss:// server."""
    redis_timeout_s: float = Field(5.0, gt=1)
    """Bound on every Redis call; above the longest blocking read (1 s)."""
    namespace: str = "conveyor"
    """Prefix of every key, so fleets can share one Redis."""
    heartbeat_ttl_s: float = Field(5.0, gt=0)
    """A process silent this long is presumed dead: its jobs are claimed or dropped."""


class TelemetrySettings(BaseSettings):
    """Logs, the /metrics page and OTLP export."""

    model_config = SETTINGS_CONFIG

    log_level: str = "INFO"
    """Python logging level."""
    log_format: LogFormat = "text"
    """json: one object per line, with request and trace ids."""
    metrics_host: str = "127.0.0.1"
    """Where /metrics listens (0.0.0.0 in a pod)."""
    metrics_port: int = Field(9400, ge=-1)
    """Port of /metrics: 0 = any free port, -1 = no page."""
    otlp_endpoint: str = ""
    """e.g. http://otel-collector:4317: traces and metrics go there by OTLP/gRPC."""
    otlp_metrics_interval_s: float = Field(10.0, gt=0)
    """How often metrics go out by OTLP."""


class ModelSettings(BaseSettings):
    """The model a process serves (a worker) or fronts first (a gateway)."""

    model_config = SETTINGS_CONFIG

    model: Path = Path("models/smollm2-135m-instruct")
    """Checkpoint directory or .gguf file."""
    model_name: str = ""
    """The id clients use; empty = the checkpoint's folder name."""
    max_model_len: int | None = None
    """Context length, prompt and completion; default: the model's max_position_embeddings."""

    @property
    def served_model_name(self) -> str:
        return model_id(self.model, self.model_name)

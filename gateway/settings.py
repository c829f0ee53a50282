"""GatewaySettings: everything a gateway can be told, by flags and CONVEYOR_* env."""

from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr

from bootstrap.settings import ModelSettings, RedisSettings, TelemetrySettings
from checkpoints import model_id


class GatewaySettings(ModelSettings, RedisSettings, TelemetrySettings):
    """Where to listen, which Redis, which models' tokenizers, and the request limits."""

    host: str = "127.0.0.1"
    """Address to listen on."""
    port: int = Field(50051, ge=0, le=65535)
    """Port of the gRPC API; 0 = any free port."""
    http_port: int = Field(-1, ge=-1, le=65535)
    """Port of the OpenAI-compatible HTTP API on the same host (and TLS); 0 = any free port, -1 = off."""
    gateway_id: str = ""
    """Default: hostname-pid; a random incarnation suffix is always added."""
    extra_models: list[Path] = []
    """More checkpoints served beside --model, each under its folder's name; the kind (generation
    or embeddings) is read from each. The first of each kind is that kind's default."""
    default_max_tokens: int = Field(256, ge=1)
    """max_tokens of a request that leaves it at 0."""
    generation_config: Literal["auto", "none"] = "auto"
    """auto: a request's unset temperature, top_p, top_k, min_p and repetition_penalty take the
    checkpoint's generation_config.json values; none: they take the API's own defaults."""
    max_open_requests_per_stream: int = Field(1024, ge=1)
    """Generations open at once on one GenerateStream."""
    max_queued_jobs: int = Field(10_000, ge=1)
    """Beyond this many jobs in a model's stream (queued or running): RESOURCE_EXHAUSTED."""
    max_in_flight: int = Field(4096, ge=1)
    """Beyond this many open calls on this gateway: RESOURCE_EXHAUSTED."""
    max_in_flight_per_caller: int = Field(0, ge=0)
    """Open calls per caller (API key name, else peer address); 0 = no cap."""
    requests_per_s_per_caller: float = Field(0.0, ge=0)
    """Calls per second per caller; 0 = no rate limit."""
    retry_after_ms: int = Field(1000, ge=1)
    """The retry hint when capacity ran out."""
    tokenizer_threads: int = Field(4, ge=1)
    """Threads that tokenize and detokenize, off the event loop."""
    health_interval_s: float = Field(1.0, gt=0)
    """How often health is refreshed and the heartbeat renewed."""
    job_watch_interval_s: float = Field(5.0, gt=0)
    """A quiet call checks this often that its job still exists."""
    max_redis_outage_s: float = Field(30.0, gt=0)
    """A call waits out a Redis outage this long, then UNAVAILABLE."""
    grace_s: float = Field(5.0, ge=0)
    """SIGTERM: open calls may finish this long."""
    api_keys_file: Path | None = None
    """API keys, one `name:key` or `name:key:model,model` per line; none configured = open gateway."""
    api_keys: SecretStr = SecretStr("")
    """API keys as above, separated by whitespace (CONVEYOR_API_KEYS)."""
    tls_cert_file: Path | None = None
    """PEM certificate; with tls_key_file, the port speaks TLS."""
    tls_key_file: Path | None = None
    """PEM private key of tls_cert_file."""
    tls_client_ca_file: Path | None = None
    """PEM; clients must present a certificate it signed (mutual TLS)."""

    @property
    def served_models(self) -> list[tuple[str, Path]]:
        """(id, checkpoint) of every model, the main one first."""
        return [(self.served_model_name, self.model)] + [(model_id(path), path) for path in self.extra_models]

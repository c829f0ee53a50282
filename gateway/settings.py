"""GatewaySettings: everything a gateway can be told, by flags and CONVEYOR_* env."""

from pathlib import Path

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from protos.streams import model_id


class GatewaySettings(BaseSettings):
    """Where to listen, which Redis, which model's tokenizer, and the request limits."""

    model_config = SettingsConfigDict(
        env_prefix="CONVEYOR_", frozen=True, extra="ignore", cli_kebab_case=True, cli_implicit_flags=True
    )

    host: str = "127.0.0.1"
    port: int = Field(50051, ge=0, le=65535)  # 0 = any free port
    redis_url: str = "redis://127.0.0.1:6379/0"
    namespace: str = "conveyor"
    gateway_id: str = ""  # default: hostname-pid; a random incarnation suffix is always added
    model: Path = Path("models/smollm2-135m-instruct")  # checkpoint directory (tokenizer, config)
    model_name: str = ""  # id clients use; empty = the checkpoint's folder name
    max_model_len: int | None = None  # default: the model's max_position_embeddings
    default_max_tokens: int = Field(256, ge=1)  # when a request leaves max_tokens at 0
    max_open_requests_per_stream: int = Field(1024, ge=1)
    max_queued_jobs: int = Field(10_000, ge=1)  # RESOURCE_EXHAUSTED beyond this many unread jobs
    tokenizer_threads: int = Field(4, ge=1)
    health_interval_s: float = Field(1.0, gt=0)  # also how often the heartbeat is renewed
    heartbeat_ttl_s: float = Field(5.0, gt=0)  # silent this long: workers drop this gateway's jobs
    grace_s: float = Field(5.0, ge=0)  # SIGTERM: let open calls finish this long
    log_level: str = "INFO"

    @property
    def served_model_name(self) -> str:
        return model_id(self.model, self.model_name)

"""The Redis layout shared by gateways and workers: key names, the consumer group, entry encoding."""

from dataclasses import dataclass
from pathlib import Path

GROUP = "workers"  # consumer group on every requests stream
FIELD = b"m"  # every stream entry carries one serialized protobuf message under this field
RESPONSES_MAXLEN = 10_000  # approximate cap of each gateway's response stream
CANCEL_MAXLEN = 10_000  # approximate cap of the cancel stream
DEAD_MAXLEN = 10_000


@dataclass(frozen=True, slots=True)
class StreamKeys:
    """Key names under one namespace."""

    namespace: str

    def requests(self, model: str) -> str:
        """Jobs for one model (stream, group `workers`)."""
        return f"{self.namespace}:requests:{model}"

    def responses(self, gateway_id: str) -> str:
        """Token batches for one gateway (stream)."""
        return f"{self.namespace}:responses:{gateway_id}"

    @property
    def cancel(self) -> str:
        """Cancels, read by every worker (stream)."""
        return f"{self.namespace}:cancel"

    def worker(self, worker_id: str) -> str:
        """One worker's heartbeat (hash with a TTL, field `status`)."""
        return f"{self.namespace}:worker:{worker_id}"

    @property
    def worker_pattern(self) -> str:
        return f"{self.namespace}:worker:*"

    @property
    def dead(self) -> str:
        """Jobs no worker could run, with the reason (stream)."""
        return f"{self.namespace}:dead"


def model_id(model: Path, name: str = "") -> str:
    """The id a model is served under (and its request stream named after): `name`, else the
    checkpoint folder's name, or a GGUF file's stem."""
    if name:
        return name
    return model.stem if model.suffix == ".gguf" else model.name

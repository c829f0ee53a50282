"""The Redis layout shared by gateways and workers: key names, the consumer group, entry encoding."""

import struct
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

    @property
    def requests_pattern(self) -> str:
        return f"{self.namespace}:requests:*"

    def worker(self, worker_id: str) -> str:
        """One worker's heartbeat (hash with a TTL, field `status`)."""
        return f"{self.namespace}:worker:{worker_id}"

    @property
    def worker_pattern(self) -> str:
        return f"{self.namespace}:worker:*"

    def gateway(self, gateway_id: str) -> str:
        """One gateway's heartbeat (a serialized GatewayStatus with a TTL): workers drop the work of a
        gateway without one."""
        return f"{self.namespace}:gateway:{gateway_id}"

    @property
    def gateway_pattern(self) -> str:
        return f"{self.namespace}:gateway:*"

    def progress(self, request_id: str) -> str:
        """Token ids already delivered for a running job (packed, see `pack_tokens`), to resume it."""
        return f"{self.namespace}:progress:{request_id}"

    @property
    def dead(self) -> str:
        """Jobs no worker could run, with the reason (stream)."""
        return f"{self.namespace}:dead"


def pack_tokens(token_ids: list[int]) -> bytes:
    """Token ids as little-endian uint32s: token i of a completion is at byte 4 * i."""
    return struct.pack(f"<{len(token_ids)}I", *token_ids)


def unpack_tokens(packed: bytes | None) -> list[int]:
    if not packed:
        return []
    return list(struct.unpack(f"<{len(packed) // 4}I", packed[: len(packed) // 4 * 4]))


def model_id(model: Path, name: str = "") -> str:
    """The id a model is served under (and its request stream named after): `name`, else the
    checkpoint folder's name, or a GGUF file's stem."""
    if name:
        return name
    return model.stem if model.suffix == ".gguf" else model.name

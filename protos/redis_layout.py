"""The whole Redis layout shared by gateways, workers and `conveyor monitor`: every key, group,
field and rule that more than one process depends on. Nothing here talks to Redis.

Keys, all under one namespace `{ns}`:

| key | type | written by | read by |
|---|---|---|---|
| `{ns}:requests:{model}` | stream, group `workers` | gateways (XADD a `Job`) | workers (XREADGROUP, XCLAIM) |
| `{ns}:responses:{gateway}` | stream, MAXLEN ~ | workers (a `TokenBatch`) | that gateway (XREAD) |
| `{ns}:cancel` | stream, MAXLEN ~ | gateways (a `Cancel`) | every worker (XREAD) |
| `{ns}:worker:{worker}` | hash, TTL, field `status` | its worker (`WorkerStatus`) | all, monitor |
| `{ns}:gateway:{gateway}` | string with a TTL | its gateway (a `GatewayStatus`) | workers, monitor |
| `{ns}:progress:{request}` | string with a TTL | workers | the worker that resumes the job |
| `{ns}:dead` | stream, MAXLEN ~ | workers (`job`, `reason`, `worker`) | operators |

Every stream entry but the dead stream's holds one serialized protobuf under the field `m`.

Acknowledgement: a worker acknowledges a job (XACK) and deletes it from its stream (XDEL) in the
same script that publishes its last chunk or buries it. So the length of a requests stream is the
number of jobs queued or running, and a job whose entry is gone from the stream has ended (or was
lost with Redis' data): gateways count and watch jobs by this rule.

Progress: the token ids a worker has published for a running job, as little-endian uint32s (token
i at byte 4 * i, see `pack_tokens`). It is written in the same script as the chunks that carry the
tokens, so a worker that resumes the job starts exactly where the client's stream stands.

Fencing: a worker's heartbeat key is its licence to write. The worker's scripts promise:
- heartbeat: refreshes `{ns}:worker:{worker}` and its TTL, and never re-creates it once it expired
  (except for a new consumer registering), so a worker presumed dead stays dead;
- publish: only while the heartbeat key exists, atomically: the response entries, the progress
  they make, the acknowledgement and deletion of finished jobs, and the burial of dead ones;
- forget consumer: deletes a group consumer only if it has no heartbeat and holds nothing pending.
A worker whose heartbeat key is gone is dead to the fleet: others claim its pending jobs (XCLAIM)
and resume them from their progress; a job delivered `max_job_attempts` times is buried.
"""

import struct
from dataclasses import dataclass

GROUP = "workers"  # consumer group on every requests stream
FIELD = b"m"  # the field of every stream entry (but the dead stream's): one serialized message
WORKER_STATUS_FIELD = "status"  # the hash field of a worker's heartbeat: a WorkerStatus
DEAD_FIELDS = ("job", "reason", "worker")  # a dead-stream entry: the Job bytes, why, which worker
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
        return self.requests("*")

    def worker(self, worker_id: str) -> str:
        """One worker's heartbeat (hash with a TTL, field `status`)."""
        return f"{self.namespace}:worker:{worker_id}"

    @property
    def worker_pattern(self) -> str:
        return self.worker("*")

    def gateway(self, gateway_id: str) -> str:
        """One gateway's heartbeat (a GatewayStatus with a TTL): workers drop the jobs of a gateway
        without one."""
        return f"{self.namespace}:gateway:{gateway_id}"

    @property
    def gateway_pattern(self) -> str:
        return self.gateway("*")

    def progress(self, request_id: str) -> str:
        """Token ids already delivered for a running job (see `pack_tokens`), to resume it."""
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

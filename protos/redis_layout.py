"""The whole Redis layout shared by gateways, workers and `conveyor monitor`: every key, group,
field and rule that more than one process depends on. Nothing here talks to Redis.

Keys, all under one namespace `ns`:

| key | type | written by | read by |
|---|---|---|---|
| `ns:requests:{model}` | stream, group `workers` | gateways (XADD a `Job`) | workers (XREADGROUP, XCLAIM) |
| `ns:responses:{model}:gateway` | stream, MAXLEN ~ | workers (a `TokenBatch`) | that gateway (XREAD) |
| `ns:cancel:{model}` | stream, MAXLEN ~ | gateways (a `Cancel`) | the model's workers (XREAD) |
| `ns:worker:{model}:worker` | hash, TTL, field `status` | its worker (`WorkerStatus`) | all, monitor |
| `ns:gateway:gateway` | string with a TTL | its gateway (a `GatewayStatus`) | workers, monitor |
| `ns:progress:{model}:request[:choice]` | string with a TTL | workers | the worker that resumes the job |
| `ns:dead:{model}` | stream, MAXLEN ~ | workers (`job`, `reason`, `worker`) | operators |

`{model}` is literal: the model id in braces is the keys' hash tag, so every key of one model lives
in one Redis Cluster slot, and every script (whose keys are all the model's) runs on one node.

Every stream entry but the dead stream's holds one serialized protobuf under the field `m`.

Acknowledgement: a worker acknowledges a job (XACK) and deletes it from its stream (XDEL) in the
same script that publishes its last chunk or buries it. So the length of a requests stream is the
number of jobs queued or running, and a job whose entry is gone from the stream has ended (or was
lost with Redis' data): gateways count and watch jobs by this rule.

Progress: the token ids a worker has published for a running job, as little-endian uint32s (token
i at byte 4 * i, see `pack_tokens`), one key per choice of the job (choice 0's key has no suffix).
It is written in the same script as the chunks that carry the tokens, so a worker that resumes the
job starts exactly where the client's stream stands. A choice that finished while others run has
its last tokens and then `FINISHED` written: a resume does not run it again. Its TTL
(`--progress-ttl-s`) is renewed every 64 tokens, and every choice's is deleted when the job ends.

Fencing: a worker's heartbeat key is its licence to write. The worker's scripts promise:
- heartbeat: refreshes `ns:worker:{model}:worker` and its TTL, and never re-creates it once it expired
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
CANCEL_MAXLEN = 10_000  # approximate cap of each cancel stream
DEAD_MAXLEN = 10_000
FINISHED = 0xFFFFFFFF  # in a choice's progress after its last token: that choice has ended
# The most completions (Sampling.n) one job may ask for: its choices run at once on one worker.
MAX_CHOICES = 16


@dataclass(frozen=True, slots=True)
class StreamKeys:
    """Key names under one namespace. Every key of one model carries the hash tag `{model}`, so a
    Redis Cluster keeps them in one slot and each script's keys on one node."""

    namespace: str

    def _of(self, kind: str, model: str) -> str:
        if "{" in model or "}" in model:
            raise ValueError(f"model id {model!r}: braces would break its keys' hash tag")
        return f"{self.namespace}:{kind}:{{{model}}}"

    def requests(self, model: str) -> str:
        """Jobs for one model (stream, group `workers`)."""
        return self._of("requests", model)

    def responses(self, model: str, gateway_id: str) -> str:
        """Token batches of one model's workers for one gateway (stream)."""
        return f"{self._of('responses', model)}:{gateway_id}"

    def cancel(self, model: str) -> str:
        """Cancels of one model's jobs, read by each of its workers (stream)."""
        return self._of("cancel", model)

    def worker(self, model: str, worker_id: str) -> str:
        """One worker's heartbeat (hash with a TTL, field `status`)."""
        return f"{self._of('worker', model)}:{worker_id}"

    def progress(self, model: str, request_id: str, choice_index: int = 0) -> str:
        """Token ids already delivered for one choice of a running job (see `pack_tokens`), to
        resume it."""
        suffix = f":{choice_index}" if choice_index else ""
        return f"{self._of('progress', model)}:{request_id}{suffix}"

    def dead(self, model: str) -> str:
        """One model's jobs that no worker could run, with the reason (stream)."""
        return self._of("dead", model)

    def gateway(self, gateway_id: str) -> str:
        """One gateway's heartbeat (a GatewayStatus with a TTL): workers drop the jobs of a gateway
        without one."""
        return f"{self.namespace}:gateway:{gateway_id}"

    @property
    def requests_pattern(self) -> str:
        return f"{self.namespace}:requests:*"

    @property
    def worker_pattern(self) -> str:
        return f"{self.namespace}:worker:*"

    @property
    def gateway_pattern(self) -> str:
        return f"{self.namespace}:gateway:*"

    def model_of(self, requests_key: str) -> str:
        """The model whose requests stream this is."""
        return requests_key.removeprefix(f"{self.namespace}:requests:").strip("{}")


def pack_tokens(token_ids: list[int]) -> bytes:
    """Token ids as little-endian uint32s: token i of a completion is at byte 4 * i."""
    return struct.pack(f"<{len(token_ids)}I", *token_ids)


def unpack_tokens(packed: bytes | None) -> list[int]:
    if not packed:
        return []
    return list(struct.unpack(f"<{len(packed) // 4}I", packed[: len(packed) // 4 * 4]))


@dataclass(frozen=True, slots=True)
class ChoiceProgress:
    """What one choice of a job had delivered when its worker stopped."""

    token_ids: tuple[int, ...] = ()
    finished: bool = False  # its last chunk went out: nothing more is due for it

    @classmethod
    def unpack(cls, packed: bytes | None) -> "ChoiceProgress":
        token_ids = unpack_tokens(packed)
        if token_ids and token_ids[-1] == FINISHED:
            return cls(tuple(token_ids[:-1]), True)
        return cls(tuple(token_ids))

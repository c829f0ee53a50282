"""JobWatch: how a call whose worker has gone quiet finds out that its job is lost."""

import time
from dataclasses import dataclass

from redis.exceptions import RedisError

from gateway.errors import Unavailable
from gateway.queues import GatewayQueues


@dataclass(frozen=True, slots=True)
class WatchPolicy:
    interval_s: float  # a call that hears nothing this long checks that its job still exists
    max_outage_s: float  # Redis unreachable this long: the call ends with UNAVAILABLE


@dataclass(slots=True)
class JobWatch:
    """Checks, when asked, that one job is still queued or running.

    A job is acknowledged and deleted in the same step that publishes its last chunk (the layout's
    acknowledgement rule), so a job missing at two checks in a row, with no last chunk between
    them, was lost (Redis restarted without persistence); so is one whose Redis stays unreachable
    past the policy's bound.
    """

    queues: GatewayQueues
    model: str
    entry_id: bytes
    policy: WatchPolicy
    unreachable_since: float | None = None
    missing_checks: int = 0

    async def check(self) -> None:
        """Raises Unavailable once the job is known to be lost."""
        now = time.monotonic()
        try:
            pending = await self.queues.is_pending(self.model, self.entry_id)
        except RedisError as error:
            self.unreachable_since = self.unreachable_since or now
            if now - self.unreachable_since >= self.policy.max_outage_s:
                raise Unavailable(
                    f"Redis unreachable for {now - self.unreachable_since:.0f} s ({error}); "
                    "the request may not have finished: retry"
                ) from error
            return
        self.unreachable_since = None
        self.missing_checks = 0 if pending else self.missing_checks + 1
        if self.missing_checks >= 2:
            raise Unavailable("the job was lost from the queue (Redis restarted without its data?): retry")

"""LoadLimits: what one gateway lets in — open generations in all, and per caller, and a rate.

Over a limit the answer is RESOURCE_EXHAUSTED at once, with how long to wait, instead of a queue
that grows without end: the client's retry policy (or its operator) spreads the load.
"""

import time
from collections.abc import Callable
from dataclasses import dataclass, field

from gateway.errors import Overloaded, Unavailable


@dataclass(frozen=True, slots=True)
class LimitSettings:
    max_queued_jobs: int  # jobs in the model's stream, queued or running, across the fleet
    max_in_flight: int  # open generations on this gateway
    max_in_flight_per_caller: int  # 0 = no per-caller cap
    requests_per_s_per_caller: float  # 0 = no rate limit; bursts of up to one second's worth
    retry_after_ms: int  # the hint when capacity, not a rate, is what ran out


@dataclass(slots=True)
class _Bucket:
    tokens: float
    updated_s: float


@dataclass(slots=True)
class Lease:
    """One admitted generation; `release()` when it ends (idempotent)."""

    limits: "LoadLimits"
    caller: str
    released: bool = False

    def release(self) -> None:
        if not self.released:
            self.released = True
            self.limits._release(self.caller)


@dataclass(slots=True)
class LoadLimits:
    settings: LimitSettings
    clock: Callable[[], float] = time.monotonic
    in_flight: int = 0
    closed: bool = False  # shutting down: new generations are refused, open ones finish
    _per_caller: dict[str, int] = field(default_factory=dict)
    _buckets: dict[str, _Bucket] = field(default_factory=dict)

    def admit(self, caller: str, queued_jobs: int) -> Lease:
        """A lease for one more generation from `caller`, or Overloaded with a retry hint."""
        settings = self.settings
        if self.closed:
            raise Unavailable("this gateway is shutting down: retry (another replica will answer)")
        if queued_jobs >= settings.max_queued_jobs:
            raise Overloaded(
                f"{queued_jobs} jobs are queued (limit {settings.max_queued_jobs}); "
                f"retry in {settings.retry_after_ms} ms",
                settings.retry_after_ms,
            )
        if self.in_flight >= settings.max_in_flight:
            raise Overloaded(
                f"this gateway has {self.in_flight} generations open (limit {settings.max_in_flight}); "
                f"retry in {settings.retry_after_ms} ms",
                settings.retry_after_ms,
            )
        open_for_caller = self._per_caller.get(caller, 0)
        if settings.max_in_flight_per_caller and open_for_caller >= settings.max_in_flight_per_caller:
            raise Overloaded(
                f"caller {caller} has {open_for_caller} generations open "
                f"(limit {settings.max_in_flight_per_caller}); retry in {settings.retry_after_ms} ms",
                settings.retry_after_ms,
            )
        if settings.requests_per_s_per_caller:
            self._take_token(caller)
        self.in_flight += 1
        self._per_caller[caller] = open_for_caller + 1
        return Lease(self, caller)

    def _take_token(self, caller: str) -> None:
        rate = self.settings.requests_per_s_per_caller
        burst = max(rate, 1.0)
        now = self.clock()
        bucket = self._buckets.setdefault(caller, _Bucket(burst, now))
        bucket.tokens = min(burst, bucket.tokens + (now - bucket.updated_s) * rate)
        bucket.updated_s = now
        if bucket.tokens < 1.0:
            wait_ms = int((1.0 - bucket.tokens) / rate * 1000) + 1
            raise Overloaded(f"caller {caller} is over {rate:g} requests/s; retry in {wait_ms} ms", wait_ms)
        bucket.tokens -= 1.0
        if len(self._buckets) > 4 * self.settings.max_in_flight:
            self._forget_full_buckets(now)

    def _forget_full_buckets(self, now: float) -> None:
        """Callers whose bucket has refilled are indistinguishable from new ones: drop them, so
        memory stays bounded however many callers come and go."""
        rate = self.settings.requests_per_s_per_caller
        burst = max(rate, 1.0)
        self._buckets = {
            caller: bucket
            for caller, bucket in self._buckets.items()
            if bucket.tokens + (now - bucket.updated_s) * rate < burst
        }

    def _release(self, caller: str) -> None:
        self.in_flight -= 1
        remaining = self._per_caller[caller] - 1
        if remaining:
            self._per_caller[caller] = remaining
        else:
            del self._per_caller[caller]

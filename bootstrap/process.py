"""The start every gateway and worker process makes: telemetry (logging first), stack dumps on
SIGUSR1, the settings in the log, and the process's name."""

import asyncio
import faulthandler
import logging
import os
import secrets
import signal
import socket
from collections.abc import Callable
from dataclasses import dataclass

from bootstrap.settings import TelemetrySettings
from telemetry.process_telemetry import Telemetry

logger = logging.getLogger(__name__)

_STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)
# A process that cannot serve what it was given (sysexits' EX_CONFIG): its last log line says why,
# and restarting it would fail the same way.
EXIT_CANNOT_SERVE = 78


@dataclass(frozen=True, slots=True)
class Process:
    name: str  # the configured id, else hostname-pid; see `incarnation`
    telemetry: Telemetry

    @classmethod
    def start(
        cls, kind: str, settings: TelemetrySettings, configured_id: str, secret_fields: set[str]
    ) -> "Process":
        """`kind` is "gateway" or "worker". `kill -USR1 <pid>` writes every thread's stack to
        stderr, beside the log: how an operator (or a test) sees where a process that does not stop
        is stuck."""
        telemetry = Telemetry.start(kind, settings)
        faulthandler.register(signal.SIGUSR1, all_threads=True)
        logger.info("settings: %s", settings.model_dump(exclude=secret_fields))
        return cls(configured_id or f"{socket.gethostname()}-{os.getpid()}", telemetry)


def incarnation(name: str) -> str:
    """The name plus a random suffix: a restarted process (same host and pid in a container) never
    takes over the jobs or the responses of the one before it."""
    return f"{name}-{secrets.token_hex(3)}"


def on_stop_signals(stop: Callable[[], None], loop: asyncio.AbstractEventLoop | None = None) -> None:
    """Call `stop` on SIGTERM or SIGINT: from the event loop when one is given, else as a handler."""
    for sig in _STOP_SIGNALS:
        if loop is not None:
            loop.add_signal_handler(sig, stop)
        else:
            signal.signal(sig, lambda *_: stop())

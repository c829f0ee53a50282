"""Supervisor: keeps a tree of child processes running, as `conveyor serve` needs.

A child that dies (or fails to start) while the tree is not stopping is restarted after a backoff
that doubles with each death within a window, and the tree gives up, with the reason, when one
child dies too often within that window. The tree is ready only when every child's probe says so;
a child restarted after it served is reported when it serves again. Children are started through
`die_with_parent`, so they die with the supervisor even when it is killed with SIGKILL, and in
sessions of their own, so a terminal's Ctrl-C reaches only the supervisor, which then stops them
in stages: what takes calls first, what the others drain through last.
"""

import logging
import os
import signal
import subprocess
import sys
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from bootstrap.process import EXIT_CANNOT_SERVE

logger = logging.getLogger(__name__)

_POLL_S = 0.2


@dataclass(frozen=True, slots=True)
class RestartPolicy:
    first_backoff_s: float = 0.5
    max_backoff_s: float = 10.0
    max_restarts: int = 5  # deaths of one child within window_s that end the tree
    window_s: float = 60.0


def orphan_guard() -> tuple[str, ...]:
    """The command prefix that makes a child die with this process."""
    return (sys.executable, "-m", "client.die_with_parent", str(os.getpid()))


def describe_exit(returncode: int) -> str:
    if returncode >= 0:
        return f"exit code {returncode}"
    try:
        return f"signal {signal.Signals(-returncode).name}"
    except ValueError:
        return f"signal {-returncode}"


@dataclass(slots=True)
class Child:
    """One supervised process: how to start it, how to tell that it serves, and in which stage of
    a shutdown it is stopped (lower first)."""

    name: str
    launch: Callable[[], subprocess.Popen[bytes]]
    ready: Callable[[], bool]
    stop_stage: int = 0
    process: subprocess.Popen[bytes] | None = None
    deaths: deque[float] = field(default_factory=deque)  # when it died, within the window
    restart_at: float | None = None  # dead, waiting out its backoff
    serving: bool = False
    served_before: bool = False
    launch_error: str = ""

    def start(self) -> None:
        self.restart_at, self.serving, self.launch_error = None, False, ""
        try:
            self.process = self.launch()
        except (OSError, RuntimeError) as error:
            self.process, self.launch_error = None, str(error)

    def exit_status(self) -> str | None:
        """Why it is not running, or None while it runs."""
        if self.launch_error:
            return f"a failed start ({self.launch_error})"
        assert self.process is not None
        returncode = self.process.poll()
        return None if returncode is None else describe_exit(returncode)


class Supervisor:
    def __init__(self, children: list[Child], policy: RestartPolicy, on_ready: Callable[[], None]):
        self.children = children
        self.policy = policy
        self.on_ready = on_ready
        self.give_up_reason = ""

    def run(self, stopping: Callable[[], bool]) -> int:
        """Start every child in order, then watch them until `stopping()` (exit 0) or until one
        dies too often (exit 1); every child is stopped on the way out."""
        ready_reported = False
        try:
            for child in self.children:
                child.start()
            while not stopping():
                now = time.monotonic()
                for child in self.children:
                    if not self._watch(child, now):
                        return 1
                if not ready_reported and all(child.serving for child in self.children):
                    ready_reported = True
                    self.on_ready()
                time.sleep(_POLL_S)
            return 0
        finally:
            self.stop()

    def _watch(self, child: Child, now: float) -> bool:
        """One look at a child: restart it when due, note when it serves; False: give up."""
        if child.restart_at is not None:
            if now >= child.restart_at:
                logger.warning(
                    "restarting %s (death %d within %g s)",
                    child.name,
                    len(child.deaths),
                    self.policy.window_s,
                )
                child.start()
            return True
        status = child.exit_status()
        if status is None:
            if not child.serving and child.ready():
                child.serving = True
                if child.served_before:
                    logger.info("%s serves again", child.name)
                child.served_before = True
            return True
        if child.process is not None and child.process.returncode == EXIT_CANNOT_SERVE:
            self.give_up_reason = f"{child.name} cannot serve what it was given ({status}); giving up"
            logger.error("%s", self.give_up_reason)
            return False
        while child.deaths and child.deaths[0] < now - self.policy.window_s:
            child.deaths.popleft()
        child.deaths.append(now)
        if len(child.deaths) > self.policy.max_restarts:
            self.give_up_reason = (
                f"{child.name} died {len(child.deaths)} times within {self.policy.window_s:g} s "
                f"(last: {status}); giving up"
            )
            logger.error("%s", self.give_up_reason)
            return False
        backoff = min(self.policy.first_backoff_s * 2 ** (len(child.deaths) - 1), self.policy.max_backoff_s)
        logger.error("%s exited with %s; restarting in %.1f s", child.name, status, backoff)
        child.restart_at = now + backoff
        return True

    def stop(self, timeout_s: float = 40.0) -> None:
        """Stage by stage, SIGTERM to every child of the stage (each drains: a gateway finishes its
        open calls, a worker its jobs), SIGKILL to any still alive after `timeout_s`."""
        for stage in sorted({child.stop_stage for child in self.children}):
            self._stop([c for c in self.children if c.stop_stage == stage], timeout_s)

    @staticmethod
    def _stop(children: list[Child], timeout_s: float) -> None:
        running = [c.process for c in children if c.process is not None and c.process.poll() is None]
        for process in running:
            process.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + timeout_s
        for process in running:
            try:
                process.wait(timeout=max(deadline - time.monotonic(), 0.1))
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()

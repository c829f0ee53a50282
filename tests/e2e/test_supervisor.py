"""`conveyor serve` as users run it: a worker killed with streams in flight is restarted and the
streams complete exactly; the supervisor killed with SIGKILL takes its whole tree with it; SIGTERM
drains and stops; a worker that dies at every start ends the tree with the reason."""

import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import redis

from client.redis_server import free_port
from protos import inference_pb2
from tests.e2e.cluster import FAST_FAILOVER_ARGS, TEST_WORKER_ARGS, wait_for
from tests.e2e.recording import RecordedStream
from tests.e2e.test_chaos import NUM_STREAMS, _pending_of, pending_by_consumer, run_streams

ROOT = Path(__file__).resolve().parents[2]


def start_serve(log_path: Path, *args: str) -> subprocess.Popen[bytes]:
    with log_path.open("wb") as log:
        return subprocess.Popen(
            # Any free port for the HTTP API: these runs follow each other faster than ports free up.
            [sys.executable, "-m", "client", "serve", "--no-embedder", "--http-port", "0", *args],
            cwd=ROOT,
            stdout=log,
            stderr=subprocess.STDOUT,
        )


def serve_until_it_exits(log_path: Path, *args: str) -> tuple[int, str]:
    """Run `conveyor serve` that is expected to stop by itself; its exit code and its log."""
    serve = start_serve(log_path, *args)
    try:
        returncode = serve.wait(timeout=120)
    finally:
        if serve.poll() is None:
            serve.kill()
    return returncode, log_path.read_text()


def wait_for_line(log_path: Path, pattern: str, timeout_s: float = 180.0) -> re.Match[str]:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        found = re.search(pattern, log_path.read_text(errors="replace"))
        if found:
            return found
        time.sleep(0.2)
    raise AssertionError(f"no {pattern!r} in {log_path}:\n{log_path.read_text(errors='replace')[-3000:]}")


def children_of(pid: int) -> dict[int, str]:
    """Live processes whose parent is `pid`, with their command lines."""
    found = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        fields = stat.rsplit(")", 1)[1].split()
        if int(fields[1]) == pid and fields[0] != "Z":
            found[int(entry.name)] = cmdline
    return found


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def port_is_free(port: int) -> bool:
    """Nothing listens on it: a new server could bind it (as servers do, past TIME_WAIT)."""
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("127.0.0.1", port))
            sock.listen()
        except OSError:
            return False
    return True


def test_a_killed_worker_is_restarted_and_its_streams_complete_then_the_tree_dies_with_its_supervisor(
    tmp_path: Path,
) -> None:
    port = free_port()
    worker_args = ("--worker-args", *FAST_FAILOVER_ARGS, *TEST_WORKER_ARGS, "--max-num-seqs", "16")
    serve = start_serve(tmp_path / "serve.log", "--workers", "2", "--port", str(port), *worker_args)
    children: dict[int, str] = {}
    try:
        redis_url = wait_for_line(tmp_path / "serve.log", r"serving on .* --redis-url (\S+)").group(1)
        children = children_of(serve.pid)
        workers = [pid for pid, cmd in children.items() if " -m worker " in cmd]
        assert len(children) == 4 and len(workers) == 2, children  # redis, gateway, two workers
        address = f"127.0.0.1:{port}"
        prompts = [f"Write a short story about a {n}-legged robot." for n in range(NUM_STREAMS)]
        undisturbed = run_streams(address, prompts)
        assert all(s.error is None for s in undisturbed)
        client = redis.Redis.from_url(redis_url)

        def kill_the_busier_worker(streams: list[RecordedStream]) -> None:
            assert wait_for(lambda: all(len(s.token_ids) >= 2 for s in streams), timeout_s=120)
            pending = pending_by_consumer(client, "conveyor")
            victim = max(workers, key=lambda pid: _pending_of(pending, pid))
            assert _pending_of(pending, victim) > 0
            os.kill(victim, signal.SIGKILL)

        disturbed = run_streams(address, prompts, kill_the_busier_worker)
        client.close()
        for before, after in zip(undisturbed, disturbed, strict=True):
            assert after.error is None, after.error
            assert after.indexes == list(range(after.max_tokens)), "an index twice or missing"
            assert after.token_ids == before.token_ids, "greedy text differs from the undisturbed run"
            assert after.frames[-1].finish_reason == inference_pb2.FINISH_REASON_LENGTH
        log = tmp_path / "serve.log"
        wait_for_line(log, r"worker \d exited with signal SIGKILL; restarting in")
        wait_for_line(log, r"worker \d serves again")
        children = children_of(serve.pid)
        assert len(children) == 4, children
        serve.send_signal(signal.SIGKILL)
        serve.wait()
        assert wait_for(lambda: not any(alive(pid) for pid in children), timeout_s=10), children
        assert wait_for(lambda: port_is_free(port), timeout_s=10)
    finally:
        if serve.poll() is None:
            serve.kill()
        for pid in children:
            if alive(pid):
                os.kill(pid, signal.SIGKILL)


def test_sigterm_drains_and_stops_the_whole_tree(tmp_path: Path) -> None:
    port = free_port()
    serve = start_serve(tmp_path / "serve.log", "--port", str(port), "--worker-args", *TEST_WORKER_ARGS)
    try:
        wait_for_line(tmp_path / "serve.log", "serving on")
        children = children_of(serve.pid)
        stream = RecordedStream("Count slowly from one to forty:", 40)
        thread = threading.Thread(target=stream.run, args=(f"127.0.0.1:{port}",))
        thread.start()
        assert wait_for(lambda: len(stream.token_ids) >= 2, timeout_s=60)
        serve.send_signal(signal.SIGTERM)  # with a call in flight: it finishes before the tree stops
        thread.join(timeout=60)
        assert serve.wait(timeout=60) == 0
        assert stream.error is None and stream.indexes == list(range(40))
        assert not any(alive(pid) for pid in children)
        assert port_is_free(port)
    finally:
        if serve.poll() is None:
            serve.kill()


def test_a_worker_that_dies_at_every_start_ends_the_tree_with_the_reason(tmp_path: Path) -> None:
    returncode, text = serve_until_it_exits(
        tmp_path / "serve.log",
        "--port",
        str(free_port()),
        "--max-restarts",
        "1",
        "--worker-args",
        "--block-size",
        "0",
    )
    assert returncode == 1
    assert text.count("worker 1 exited with exit code 1; restarting in") == 1
    assert "worker 1 died 2 times within 60 s (last: exit code 1); giving up" in text
    assert "serving on" not in text

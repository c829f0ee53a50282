"""protos/ holds contracts: importing all of it starts nothing and pulls in no Redis client, HTTP
server, threads or signal handling; and the worker speaks no gRPC but for its health server."""

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_importing_the_contracts_pulls_in_nothing_that_runs() -> None:
    code = (
        "import sys, threading\n"
        "before = set(sys.modules)\n"
        "import protos.redis_layout, protos.inference_pb2, protos.jobs_pb2\n"
        "new = set(sys.modules) - before\n"
        "running = ('redis', 'http.server', 'signal', 'prometheus_client', 'opentelemetry')\n"
        "bad = [m for m in running if m in new]\n"
        "print(','.join(bad), threading.active_count())"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.split() == ["1"], result.stdout


def test_protos_holds_only_proto_files_and_the_redis_layout() -> None:
    sources = {p.name for p in (ROOT / "protos").iterdir() if p.suffix in (".py", ".proto")}
    assert {s for s in sources if "_pb2" not in s} == {
        "__init__.py",
        "inference.proto",
        "jobs.proto",
        "redis_layout.py",
    }


def test_only_the_workers_health_server_imports_grpc() -> None:
    importers = []
    for path in sorted((ROOT / "worker").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else []
            if isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module]
            if any(name == "grpc" or name.startswith(("grpc.", "grpc_")) for name in names):
                importers.append(path.name)
    assert sorted(set(importers)) == ["health.py"]

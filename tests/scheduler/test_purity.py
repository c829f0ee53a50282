import subprocess
import sys


def test_importing_scheduler_pulls_in_no_torch_redis_or_protobuf() -> None:
    code = (
        "import sys, scheduler\n"
        "bad = [m for m in ('torch', 'redis', 'google.protobuf', 'grpc', 'numpy') if m in sys.modules]\n"
        "print(','.join(bad))"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == ""

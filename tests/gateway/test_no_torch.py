import subprocess
import sys


def test_gateway_and_monitor_never_import_torch_or_transformers() -> None:
    code = (
        "import sys, gateway.server, gateway.__main__, client.cli, client.monitor\n"
        "print(','.join(m for m in ('torch', 'transformers') if m in sys.modules))"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == ""

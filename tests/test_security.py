"""Security rules that hold for the whole code base (servers and passwords: test_servers.py,
test_server_bad_input.py)."""

from __future__ import annotations

import ast
import inspect

from conftest import REPO


def calls_of(name: str):
    for path in [*(REPO / "src").rglob("*.py"), *(REPO / "tests").rglob("*.py")]:
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Call) and ast.unparse(node.func) == name:
                yield path, node


def test_torch_load_only_with_weights_only():
    """torch.load of a pickle runs arbitrary code; only tensors and plain data may be loaded."""
    for path, call in calls_of("torch.load"):
        keywords = {k.arg: k.value for k in call.keywords}
        assert "weights_only" in keywords and ast.literal_eval(keywords["weights_only"]) is True, \
            f"{path}:{call.lineno}: torch.load without weights_only=True"


def test_servers_listen_on_loopback_unless_asked():
    from mnist_sweep import server
    from mnist_sweep.servers import local

    assert inspect.signature(local.LocalServers).parameters["host"].default == "127.0.0.1"
    assert inspect.signature(local.start_mlflow_server).parameters["host"].default == "127.0.0.1"
    assert server.command_line().parse_args(["--dir", "x"]).host == "127.0.0.1"


def test_passwords_are_masked_in_what_we_show():
    from mnist_sweep.tracking.runs import redact_reason, redact_uri

    url = "postgresql://mnist:pa55word@db:5432/optuna"
    assert redact_uri(url) == "postgresql://mnist:***@db:5432/optuna"
    assert "pa55word" not in redact_reason(f"FATAL: login with pa55word failed for {url}", url)

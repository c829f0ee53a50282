"""ApiKeys: entries from a file and the environment, bearer tokens, per-model grants."""

from pathlib import Path

import grpc
import pytest

from gateway.auth import ApiKeys
from gateway.errors import GatewayError


def test_keys_come_from_a_file_and_an_inline_list(tmp_path: Path) -> None:
    file = tmp_path / "keys"
    file.write_text("# operators\n\nalice:sk-a\nbob:sk-b:m1,m2\n")
    keys = ApiKeys.load(file, "carol:sk-c  dave:sk-d:m2")
    assert keys is not None and len(keys) == 4
    assert keys.authenticate([("authorization", "Bearer sk-a")]).name == "alice"
    bob = keys.authenticate([("authorization", b"bearer sk-b")])
    assert bob.may_use("m1") and not bob.may_use("m3")
    assert keys.authenticate([("x-other", "1"), ("authorization", "Bearer sk-d")]).models == frozenset({"m2"})
    assert ApiKeys.load(None, "") is None, "no keys: the gateway is open"


@pytest.mark.parametrize(
    ("metadata", "message"),
    [
        ([], "missing API key"),
        ([("authorization", "Basic c2s=")], "authorization: expected `Bearer <key>`"),
        ([("authorization", "Bearer sk-wrong")], "invalid API key"),
        ([("authorization", "Bearer ")], "invalid API key"),
    ],
)
def test_a_missing_or_wrong_key_is_unauthenticated(metadata: list[tuple[str, str]], message: str) -> None:
    keys = ApiKeys(["alice:sk-a"])
    with pytest.raises(GatewayError) as error:
        keys.authenticate(metadata)
    assert error.value.code == grpc.StatusCode.UNAUTHENTICATED and error.value.message.startswith(message)


def test_a_key_without_the_model_is_permission_denied() -> None:
    principal = ApiKeys(["bob:sk-b:m1"]).authenticate([("authorization", "Bearer sk-b")])
    with pytest.raises(GatewayError) as error:
        principal.check_model("m2")
    assert error.value.code == grpc.StatusCode.PERMISSION_DENIED


@pytest.mark.parametrize("entry", ["alice", ":sk-a", "alice:", "a:b:c:d"])
def test_malformed_entries_are_refused_at_start(entry: str) -> None:
    with pytest.raises(ValueError, match="entry 1"):
        ApiKeys([entry])

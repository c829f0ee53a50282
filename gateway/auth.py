"""API keys: bearer tokens in gRPC metadata, each naming its caller and the models it may use.

Keys come from a file (one entry per line) or an environment variable (entries separated by
whitespace). An entry is `name:key` (every model) or `name:key:model,model`. Lines starting with
`#` are comments. Keys are compared in constant time and never logged; the caller's name is what
logs and per-caller limits use.
"""

import hmac
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from gateway.errors import ErrorKind, GatewayError

_SCHEME = "bearer "


@dataclass(frozen=True, slots=True)
class Principal:
    name: str
    models: frozenset[str] | None  # None: every model

    def may_use(self, model: str) -> bool:
        return self.models is None or model in self.models

    def check_model(self, model: str) -> None:
        if not self.may_use(model):
            raise GatewayError(f"API key {self.name!r} may not use model {model!r}", ErrorKind.FORBIDDEN)


@dataclass(frozen=True, slots=True)
class _Entry:
    key: bytes
    principal: Principal


class ApiKeys:
    def __init__(self, entries: Sequence[str]):
        self._entries: list[_Entry] = []
        for number, entry in enumerate(entries, 1):
            parts = entry.split(":")
            if len(parts) not in (2, 3) or not parts[0] or not parts[1]:
                raise ValueError(f"API key entry {number}: expected name:key or name:key:model,model")
            models = frozenset(m for m in parts[2].split(",") if m) if len(parts) == 3 else None
            self._entries.append(_Entry(parts[1].encode(), Principal(parts[0], models)))

    @classmethod
    def load(cls, file: Path | None, inline: str) -> "ApiKeys | None":
        """The configured keys, or None when there are none (the gateway is then open)."""
        entries = inline.split()
        if file is not None:
            lines = (line.strip() for line in file.read_text().splitlines())
            entries += [line for line in lines if line and not line.startswith("#")]
        return cls(entries) if entries else None

    def __len__(self) -> int:
        return len(self._entries)

    def authenticate(self, metadata: Sequence[tuple[str, str | bytes]] | None) -> Principal:
        """The caller named by the `authorization: Bearer <key>` header, or UNAUTHENTICATED."""
        header = next((v for k, v in metadata or () if k == "authorization"), None)
        if header is None:
            raise GatewayError(
                "missing API key: send `authorization: Bearer <key>`", ErrorKind.UNAUTHENTICATED
            )
        value = header.decode() if isinstance(header, bytes) else header
        if not value.lower().startswith(_SCHEME):
            raise GatewayError("authorization: expected `Bearer <key>`", ErrorKind.UNAUTHENTICATED)
        presented = value[len(_SCHEME) :].strip().encode()
        found = None
        for entry in self._entries:  # every entry compared, so timing says nothing about which matched
            if hmac.compare_digest(entry.key, presented):
                found = entry.principal
        if found is None:
            raise GatewayError("invalid API key", ErrorKind.UNAUTHENTICATED)
        return found

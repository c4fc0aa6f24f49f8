"""A minimal client of the policy server (the same protocol as openpi_client's
WebsocketClientPolicy): read the metadata on connect, send observation maps,
receive maps with "actions"; a text reply is the server's error message."""

from __future__ import annotations

from typing import Any

from atoll.serve import wire


class ServerError(RuntimeError):
    """The server answered a request with an error message."""


class PolicyClient:
    def __init__(self, host: str = "127.0.0.1", port: int = 8000, timeout: float = 60.0):
        from websockets.sync.client import connect

        self._connect = connect(f"ws://{host}:{port}", max_size=None, compression=None, open_timeout=timeout)
        self._ws = self._connect.__enter__()  # entered here: the connection lives as long as the client
        self.timeout = timeout
        self.metadata: dict[str, Any] = wire.unpackb(self._ws.recv(timeout=timeout))

    def infer(self, obs: dict[str, Any]) -> dict[str, Any]:
        return self.send_raw(wire.packb(obs))

    def send_raw(self, data: bytes | str) -> dict[str, Any]:
        """Sends a message as it is (tests send garbage this way)."""
        self._ws.send(data)
        reply = self._ws.recv(timeout=self.timeout)
        if isinstance(reply, str):
            raise ServerError(reply)
        return wire.unpackb(reply)

    def close(self) -> None:
        self._connect.__exit__(None, None, None)

    def __enter__(self) -> "PolicyClient":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

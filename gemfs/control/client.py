"""A blocking client of the control protocol (CLI commands, workload runner, tests).

No trio: one socket, calls made one at a time. Incoming calls are not expected by clients.
"""

from __future__ import annotations

import socket
from typing import Any, Literal

from gemfs.control.errors import CallError
from gemfs.control.protocol import (
    NEED_DATA,
    PROTOCOL_VERSION,
    Call,
    Connection,
    ConnectionClosed,
    Error,
    Hello,
    LocalProtocolError,
    RemoteProtocolError,
    Reply,
    Welcome,
)


class SyncClient:
    def __init__(
        self,
        path: str,
        role: Literal["driver", "compactor", "client"] = "client",
        name: str = "gemfs-cli",
        timeout: float = 60.0,
    ) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(timeout)
        try:
            self.sock.connect(path)
        except OSError as e:
            self.sock.close()
            raise CallError("ECONNREFUSED", f"cannot connect to {path}: {e.strerror}") from None
        self.conn = Connection("peer")
        self.sock.sendall(self.conn.send(Hello(version=PROTOCOL_VERSION, role=role, name=name)))
        ev = self._next()
        if isinstance(ev, Error):
            self.close()
            raise CallError(ev.errno, ev.message)
        if not isinstance(ev, Welcome):
            self.close()
            raise CallError("EPROTO", f"expected Welcome, got {type(ev).__name__}")
        self.info = dict(ev.info)

    def _next(self) -> object:
        while True:
            ev = self.conn.next_event()
            if ev is not NEED_DATA:
                return ev
            self.conn.receive_data(self.sock.recv(1 << 20))

    def call(self, op: str, args: dict[str, Any] | None = None) -> Any:
        try:
            return self._call(op, args or {})
        except LocalProtocolError as e:
            raise CallError("ENOTCONN", str(e)) from None
        except RemoteProtocolError as e:
            raise CallError("EPROTO", str(e)) from None

    def _call(self, op: str, args: dict[str, Any]) -> Any:
        cid = self.conn.new_call_id()
        self.sock.sendall(self.conn.send(Call(id=cid, op=op, args=args)))
        while True:
            ev = self._next()
            match ev:
                case Reply(id=i, result=result) if i == cid:
                    return result
                case Error(id=i, errno=err, message=msg) if i in (cid, 0):
                    raise CallError(err, msg)
                case ConnectionClosed():
                    raise CallError("ENOTCONN", "connection closed")
                case _:
                    continue

    def close(self) -> None:
        try:
            self.sock.close()
        except OSError:
            pass

    def __enter__(self) -> SyncClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

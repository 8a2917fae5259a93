"""The gemfs control protocol: a sans-IO codec and connection state machine (in the style of h11).

Nothing here touches a socket, a clock or an event loop. The caller owns the I/O:

    conn = Connection("server")
    conn.receive_data(await stream.receive_some())   # b"" means EOF
    while (event := conn.next_event()) is not NEED_DATA:
        ...                                           # dispatch on the event type with `match`
    await stream.send_all(conn.send(Reply(id=3, result=0)))

Wire format (see PROTOCOL.md next to this file): each frame is a 4-byte big-endian unsigned length
followed by that many bytes of msgpack, which must decode to a map with a kind key ``"k"``.

Errors: anything the remote side gets wrong raises :class:`RemoteProtocolError` from
:meth:`Connection.next_event` and leaves the connection in state ``ERROR`` (the caller may still
send one connection-level ``Error(id=0, ...)`` notice, see :meth:`RemoteProtocolError.notice`, and
then closes). Anything *we* try to do wrong raises :class:`LocalProtocolError` from
:meth:`Connection.send` and changes nothing: no bytes were produced, the connection can go on.

This module must only import the standard library and msgpack (a layering test checks it).
"""

from __future__ import annotations

import enum
import errno as _errno
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Final, Literal, TypeAlias

import msgpack

__all__ = [
    "HEADER_SIZE",
    "MAX_FRAME",
    "MAX_ID",
    "MAX_OP_LEN",
    "NEED_DATA",
    "PROTOCOL_VERSION",
    "ROLES",
    "Call",
    "Connection",
    "ConnectionClosed",
    "Error",
    "Event",
    "Hello",
    "LocalProtocolError",
    "Message",
    "NeedData",
    "Notify",
    "ProtocolError",
    "RemoteProtocolError",
    "Reply",
    "State",
    "Welcome",
    "answer_hello",
    "encode_frame",
    "errno_code",
    "errno_name",
    "version_supported",
]

PROTOCOL_VERSION: Final = 1
"""The protocol's major version. Peers with a different major version cannot talk."""

MAX_FRAME: Final = 16 * 1024 * 1024
"""Default largest accepted payload, in bytes (the 4-byte length header not counted)."""

HEADER_SIZE: Final = 4
MAX_ID: Final = 2**63 - 1
"""Call ids are 1..MAX_ID (they fit a signed 64-bit integer on any peer)."""
MAX_OP_LEN: Final = 64
MAX_NAME_LEN: Final = 256
MAX_VERSION: Final = 2**32 - 1
MAX_ERRNO_LEN: Final = 32

ROLES: Final = frozenset({"driver", "compactor", "client"})
"""What a connecting process says it is in its Hello."""

_ERRNO_RE: Final = re.compile(r"E[A-Z0-9]{1,31}")
_MAX_DEPTH: Final = 256  # nesting allowed in args/results; msgpack itself refuses around 500


# --------------------------------------------------------------------------------------------------
# Errors


class ProtocolError(Exception):
    """Base of both protocol errors; ``message`` is a short human-readable reason."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class LocalProtocolError(ProtocolError):
    """We tried to do something the protocol forbids (an invalid event, or one not allowed now)."""


class RemoteProtocolError(ProtocolError):
    """The remote side sent something malformed or not allowed in the current state."""

    def notice(self) -> Error:
        """The connection-level ``Error(id=0, errno="EPROTO")`` to send before closing."""
        return Error(id=0, errno="EPROTO", message=self.message)


def _brief(value: object, limit: int = 60) -> str:
    """A repr short enough for an error message, whatever the remote side sent."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


# --------------------------------------------------------------------------------------------------
# Field validation (events validate themselves; a bad field is a LocalProtocolError, which the
# decoder turns into a RemoteProtocolError)


def _check_int(what: str, value: object, lo: int, hi: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool):
        raise LocalProtocolError(f"{what} must be an int, not {type(value).__name__}")
    if not lo <= value <= hi:
        raise LocalProtocolError(f"{what} must be in {lo}..{hi}, not {_brief(value)}")


def _check_str(what: str, value: object, min_len: int, max_len: int | None) -> None:
    if not isinstance(value, str):
        raise LocalProtocolError(f"{what} must be a str, not {type(value).__name__}")
    if len(value) < min_len or (max_len is not None and len(value) > max_len):
        limit = "any" if max_len is None else str(max_len)
        raise LocalProtocolError(f"{what} must have {min_len}..{limit} characters: {_brief(value)}")


def _check_op(what: str, value: object) -> None:
    _check_str(what, value, 1, MAX_OP_LEN)


def _check_str_map(what: str, value: object) -> None:
    if not isinstance(value, dict):
        raise LocalProtocolError(f"{what} must be a dict, not {type(value).__name__}")
    for key in value:
        if not isinstance(key, str):
            raise LocalProtocolError(f"{what} keys must be str, not {_brief(key)}")


# --------------------------------------------------------------------------------------------------
# Events: frozen value objects, validated on construction


@dataclass(frozen=True, slots=True, kw_only=True)
class Hello:
    """First message of a connection, sent by the connecting side ("peer")."""

    version: int
    role: str
    name: str

    def __post_init__(self) -> None:
        _check_int("Hello.version", self.version, 0, MAX_VERSION)
        if not isinstance(self.role, str) or self.role not in ROLES:
            raise LocalProtocolError(
                f"Hello.role must be one of {sorted(ROLES)}, not {_brief(self.role)}"
            )
        _check_str("Hello.name", self.name, 1, MAX_NAME_LEN)


@dataclass(frozen=True, slots=True, kw_only=True)
class Welcome:
    """The server's acceptance of a Hello; ``info`` describes the server (design, pool size...)."""

    version: int
    info: dict[str, Any]

    def __post_init__(self) -> None:
        _check_int("Welcome.version", self.version, 0, MAX_VERSION)
        _check_str_map("Welcome.info", self.info)


@dataclass(frozen=True, slots=True, kw_only=True)
class Call:
    """A request; the receiver must answer it with exactly one Reply or Error with the same id."""

    id: int
    op: str
    args: dict[str, Any]

    def __post_init__(self) -> None:
        _check_int("Call.id", self.id, 1, MAX_ID)
        _check_op("Call.op", self.op)
        _check_str_map("Call.args", self.args)


@dataclass(frozen=True, slots=True, kw_only=True)
class Reply:
    """Successful answer to the call ``id`` that the other side made."""

    id: int
    result: Any

    def __post_init__(self) -> None:
        _check_int("Reply.id", self.id, 1, MAX_ID)


@dataclass(frozen=True, slots=True, kw_only=True)
class Error:
    """Failed answer to the call ``id``; ``id == 0`` is a connection-level error (then close).

    ``errno`` is a symbolic name such as ``"EAGAIN"`` (see :func:`errno_name`/:func:`errno_code`).
    """

    id: int
    errno: str
    message: str

    def __post_init__(self) -> None:
        _check_int("Error.id", self.id, 0, MAX_ID)
        _check_str("Error.errno", self.errno, 2, MAX_ERRNO_LEN)
        if _ERRNO_RE.fullmatch(self.errno) is None:
            raise LocalProtocolError(
                f"Error.errno must look like 'EAGAIN', not {_brief(self.errno)}"
            )
        _check_str("Error.message", self.message, 0, None)


@dataclass(frozen=True, slots=True, kw_only=True)
class Notify:
    """A one-way message; nothing answers it."""

    op: str
    args: dict[str, Any]

    def __post_init__(self) -> None:
        _check_op("Notify.op", self.op)
        _check_str_map("Notify.args", self.args)


@dataclass(frozen=True, slots=True, kw_only=True)
class ConnectionClosed:
    """Returned by :meth:`Connection.next_event` once the remote side closed (EOF)."""


Message: TypeAlias = Hello | Welcome | Call | Reply | Error | Notify
"""Everything that travels in a frame (what :meth:`Connection.send` accepts)."""

Event: TypeAlias = Message | ConnectionClosed
"""Everything :meth:`Connection.next_event` can return besides NEED_DATA."""

_MESSAGE_TYPES: Final = (Hello, Welcome, Call, Reply, Error, Notify)


class NeedData(enum.Enum):
    """Type of the :data:`NEED_DATA` sentinel."""

    NEED_DATA = "NEED_DATA"

    def __repr__(self) -> str:
        return self.value

    __str__ = __repr__


NEED_DATA: Final = NeedData.NEED_DATA
"""Returned by :meth:`Connection.next_event` when no complete frame is buffered yet."""


# --------------------------------------------------------------------------------------------------
# Payloads: event <-> msgpack map (keys documented in PROTOCOL.md)


def _to_payload(event: Message) -> dict[str, Any]:
    match event:
        case Hello():
            return {"k": "hello", "v": event.version, "role": event.role, "name": event.name}
        case Welcome():
            return {"k": "welcome", "v": event.version, "info": event.info}
        case Call():
            return {"k": "call", "id": event.id, "op": event.op, "a": event.args}
        case Reply():
            return {"k": "reply", "id": event.id, "r": event.result}
        case Error():
            return {"k": "error", "id": event.id, "e": event.errno, "m": event.message}
        case Notify():
            return {"k": "notify", "op": event.op, "a": event.args}


def _field(payload: dict[Any, Any], key: str) -> Any:
    try:
        return payload[key]
    except KeyError:
        raise LocalProtocolError(f"missing field {key!r}") from None


def _from_payload(payload: object) -> Message:
    """Build the event a decoded payload describes; unknown extra keys are ignored."""
    if not isinstance(payload, dict):
        raise RemoteProtocolError(f"frame payload must be a map, not {type(payload).__name__}")
    kind = payload.get("k")
    try:
        match kind:
            case "hello":
                return Hello(
                    version=_field(payload, "v"),
                    role=_field(payload, "role"),
                    name=_field(payload, "name"),
                )
            case "welcome":
                return Welcome(version=_field(payload, "v"), info=_field(payload, "info"))
            case "call":
                return Call(
                    id=_field(payload, "id"), op=_field(payload, "op"), args=_field(payload, "a")
                )
            case "reply":
                return Reply(id=_field(payload, "id"), result=_field(payload, "r"))
            case "error":
                return Error(
                    id=_field(payload, "id"),
                    errno=_field(payload, "e"),
                    message=_field(payload, "m"),
                )
            case "notify":
                return Notify(op=_field(payload, "op"), args=_field(payload, "a"))
            case _:
                raise RemoteProtocolError(f"unknown message kind {_brief(kind)}")
    except LocalProtocolError as exc:
        raise RemoteProtocolError(f"invalid {kind} message: {exc.message}") from None


def _check_encodable(value: object, depth: int = 0) -> None:
    """Refuse map keys the receiver's decoder rejects (msgpack accepts str/bytes keys only)."""
    if depth > _MAX_DEPTH:
        raise LocalProtocolError(f"value nested deeper than {_MAX_DEPTH} levels")
    if isinstance(value, dict):
        for key, item in value.items():
            if not isinstance(key, str | bytes):
                raise LocalProtocolError(f"map keys must be str or bytes, not {_brief(key)}")
            if isinstance(item, dict | list | tuple):
                _check_encodable(item, depth + 1)
    elif isinstance(value, list | tuple):
        for item in value:
            if isinstance(item, dict | list | tuple):
                _check_encodable(item, depth + 1)


def _pack(payload: Mapping[str, Any], max_frame: int) -> bytes:
    _check_encodable(payload)
    try:
        body: bytes = msgpack.packb(payload, use_bin_type=True)
    except (TypeError, ValueError, OverflowError) as exc:
        raise LocalProtocolError(f"payload cannot be encoded: {exc}") from None
    if len(body) > max_frame:
        raise LocalProtocolError(f"payload of {len(body)} bytes exceeds the {max_frame} maximum")
    return len(body).to_bytes(HEADER_SIZE, "big") + body


def _unpack(body: bytes) -> object:
    try:
        return msgpack.unpackb(body, raw=False, use_list=True)
    except (ValueError, TypeError, msgpack.UnpackException) as exc:
        # ValueError covers ExtraData, FormatError, StackError and UnicodeDecodeError.
        raise RemoteProtocolError(f"frame body is not valid msgpack: {_brief(exc)}") from None


def encode_frame(payload: Mapping[str, Any], *, max_frame: int = MAX_FRAME) -> bytes:
    """Length header + msgpack body for a raw payload map (no validation of its meaning).

    Raises LocalProtocolError if it cannot be encoded or exceeds ``max_frame``.
    """
    return _pack(payload, max_frame)


# --------------------------------------------------------------------------------------------------
# Versions and errno names


def version_supported(version: int) -> bool:
    """Whether a Hello/Welcome version can talk to this implementation (same major version)."""
    return version == PROTOCOL_VERSION


def answer_hello(hello: Hello, info: dict[str, Any]) -> Welcome | Error:
    """The server's answer to a Hello: Welcome, or Error(id=0, "EPROTO") for a foreign version."""
    if not version_supported(hello.version):
        return Error(
            id=0,
            errno="EPROTO",
            message=f"unsupported protocol version {hello.version}, server speaks "
            f"{PROTOCOL_VERSION}",
        )
    return Welcome(version=PROTOCOL_VERSION, info=info)


# errno.errorcode picks glibc's alias for a few codes; prefer the names the kernel prints.
_PREFERRED_NAMES: Final = {
    _errno.EAGAIN: "EAGAIN",
    _errno.EDEADLK: "EDEADLK",
    _errno.EOPNOTSUPP: "EOPNOTSUPP",
}
_NUMERIC_NAME_RE: Final = re.compile(r"E([0-9]{1,9})")


def errno_name(code: int) -> str:
    """Symbolic name of an errno code; negative codes (kernel style ``-EAGAIN``) are accepted.

    Codes without a name come out as ``"E<number>"``, which :func:`errno_code` reads back.
    """
    code = abs(code)
    name = _PREFERRED_NAMES.get(code) or _errno.errorcode.get(code)
    return name if name is not None else f"E{code}"


def errno_code(name: str) -> int:
    """Positive errno code for a symbolic name (``"EAGAIN"`` -> 11); ValueError if unknown."""
    value = getattr(_errno, name, None) if name.startswith("E") else None
    if isinstance(value, int) and value in _errno.errorcode:
        return value
    numeric = _NUMERIC_NAME_RE.fullmatch(name)
    if numeric is not None:
        return int(numeric.group(1))
    raise ValueError(f"unknown errno name {name!r}")


# --------------------------------------------------------------------------------------------------
# The state machine: one table


class State(enum.Enum):
    """Connection states. "peer" starts in SEND_HELLO, "server" in AWAIT_HELLO."""

    SEND_HELLO = "SEND_HELLO"  # peer: must send Hello first
    AWAIT_WELCOME = "AWAIT_WELCOME"  # peer: Hello sent, waiting for Welcome or Error(id=0)
    AWAIT_HELLO = "AWAIT_HELLO"  # server: waiting for the peer's Hello
    SEND_WELCOME = "SEND_WELCOME"  # server: Hello received, must send Welcome or Error(id=0)
    OPEN = "OPEN"  # handshake done: Call/Reply/Error/Notify both ways
    CLOSED = "CLOSED"  # EOF seen, or a connection-level Error sent/received: nothing more
    ERROR = "ERROR"  # protocol error or failed write: the connection is dead


class _Dir(enum.Enum):
    SEND = "send"
    RECV = "receive"


class _Kind(enum.Enum):
    HELLO = "Hello"
    WELCOME = "Welcome"
    CALL = "Call"
    REPLY = "Reply"
    ERROR = "Error"  # answer to a call (id > 0)
    CONN_ERROR = "Error(id=0)"  # connection-level error
    NOTIFY = "Notify"
    EOF = "EOF"


_S, _D, _K = State, _Dir, _Kind
_TRANSITIONS: Final[Mapping[tuple[State, _Dir, _Kind], State]] = {
    # handshake, peer side
    (_S.SEND_HELLO, _D.SEND, _K.HELLO): _S.AWAIT_WELCOME,
    (_S.AWAIT_WELCOME, _D.RECV, _K.WELCOME): _S.OPEN,
    # handshake, server side
    (_S.AWAIT_HELLO, _D.RECV, _K.HELLO): _S.SEND_WELCOME,
    (_S.SEND_WELCOME, _D.SEND, _K.WELCOME): _S.OPEN,
    # open connection: both directions alike
    **{
        (_S.OPEN, direction, kind): _S.OPEN
        for direction in _Dir
        for kind in (_K.CALL, _K.REPLY, _K.ERROR, _K.NOTIFY)
    },
    # a connection-level error (refusal, protocol error notice, shutdown) ends the conversation
    **{
        (state, direction, _K.CONN_ERROR): _S.CLOSED
        for state in (_S.SEND_HELLO, _S.AWAIT_WELCOME, _S.AWAIT_HELLO, _S.SEND_WELCOME, _S.OPEN)
        for direction in _Dir
    },
    # after a remote protocol error we may still send one notice (guarded by a flag)
    (_S.ERROR, _D.SEND, _K.CONN_ERROR): _S.ERROR,
    # EOF from the remote side closes from any state but ERROR
    **{(state, _D.RECV, _K.EOF): _S.CLOSED for state in State if state is not _S.ERROR},
}


def _kind_of(event: Event) -> _Kind:
    match event:
        case Hello():
            return _K.HELLO
        case Welcome():
            return _K.WELCOME
        case Call():
            return _K.CALL
        case Reply():
            return _K.REPLY
        case Error():
            return _K.CONN_ERROR if event.id == 0 else _K.ERROR
        case Notify():
            return _K.NOTIFY
        case ConnectionClosed():
            return _K.EOF


# --------------------------------------------------------------------------------------------------
# The connection


class Connection:
    """One end of a control connection: bytes in, events out; events in, bytes out.

    ``our_role`` is "server" (the core, which accepted the socket) or "peer" (the side that
    connected: driver, compactor, client). Either side may make calls once the handshake is done.
    """

    def __init__(self, our_role: Literal["server", "peer"], *, max_frame: int = MAX_FRAME) -> None:
        if our_role not in ("server", "peer"):
            raise ValueError(f"our_role must be 'server' or 'peer', not {our_role!r}")
        if not 1 <= max_frame < 2 ** (8 * HEADER_SIZE):
            raise ValueError(f"max_frame out of range: {max_frame}")
        self._our_role: Literal["server", "peer"] = our_role
        self._max_frame = max_frame
        self._state = State.AWAIT_HELLO if our_role == "server" else State.SEND_HELLO
        self._buffer = bytearray()
        self._pos = 0  # start of the unread data in _buffer
        self._eof = False
        self._may_send_notice = False
        self._our_calls: set[int] = set()  # ids of our calls the remote side has not answered
        self._their_calls: set[int] = set()  # ids of the remote side's calls we have not answered
        self._next_id = 1
        self._peer_role: str | None = None
        self._peer_name: str | None = None
        self._version: int | None = None

    def __repr__(self) -> str:
        return (
            f"<Connection {self._our_role} {self._state.name} peer_role={self._peer_role!r} "
            f"our_calls={len(self._our_calls)} their_calls={len(self._their_calls)}>"
        )

    # -- read-only views ---------------------------------------------------------------------------

    @property
    def our_role(self) -> Literal["server", "peer"]:
        return self._our_role

    @property
    def state(self) -> State:
        return self._state

    @property
    def max_frame(self) -> int:
        return self._max_frame

    @property
    def peer_role(self) -> str | None:
        """Role from the Hello the server received ("driver", ...); None on the peer side."""
        return self._peer_role

    @property
    def peer_name(self) -> str | None:
        """Name from the Hello the server received; None on the peer side."""
        return self._peer_name

    @property
    def version(self) -> int | None:
        """Protocol version of the Welcome sent or received; None before the handshake is done."""
        return self._version

    @property
    def our_outstanding(self) -> frozenset[int]:
        """Ids of calls we sent that have not been answered yet."""
        return frozenset(self._our_calls)

    @property
    def their_outstanding(self) -> frozenset[int]:
        """Ids of calls we received and have not answered yet."""
        return frozenset(self._their_calls)

    @property
    def trailing_data(self) -> tuple[bytes, bool]:
        """Unprocessed buffered bytes and whether EOF was received (for diagnostics)."""
        return bytes(self._buffer[self._pos :]), self._eof

    # -- receiving ---------------------------------------------------------------------------------

    def receive_data(self, data: bytes) -> None:
        """Add bytes read from the socket; ``b""`` means the remote side closed (EOF)."""
        if self._eof:
            raise LocalProtocolError("received data after EOF")
        if not data:
            self._eof = True
        elif self._state is not State.ERROR:
            self._buffer += data

    def next_event(self) -> Event | NeedData:
        """Decode at most one frame: an event, NEED_DATA, or ConnectionClosed after EOF.

        Raises RemoteProtocolError on anything malformed or not allowed now; the connection is
        then in state ERROR and every later call raises again.
        """
        if self._state is State.ERROR:
            raise RemoteProtocolError("connection is in the ERROR state")
        try:
            return self._next_event()
        except RemoteProtocolError:
            self._state = State.ERROR
            self._may_send_notice = True
            self._buffer.clear()
            self._pos = 0
            raise

    def _next_event(self) -> Event | NeedData:
        available = len(self._buffer) - self._pos
        if available < HEADER_SIZE:
            if not self._eof:
                return NEED_DATA
            if available:
                raise RemoteProtocolError("EOF inside a frame header")
            closed = ConnectionClosed()
            self._apply(_Dir.RECV, closed, self._check(_Dir.RECV, closed))
            return closed
        start = self._pos + HEADER_SIZE
        length = int.from_bytes(self._buffer[self._pos : start], "big")
        if length > self._max_frame:  # before waiting for (or buffering more of) the body
            raise RemoteProtocolError(
                f"frame length {length} exceeds the {self._max_frame} byte maximum"
            )
        if available - HEADER_SIZE < length:
            if self._eof:
                raise RemoteProtocolError("EOF inside a frame body")
            return NEED_DATA
        body = bytes(self._buffer[start : start + length])
        self._pos = start + length
        if self._pos * 2 >= len(self._buffer):  # amortized: drop consumed bytes
            del self._buffer[: self._pos]
            self._pos = 0
        event = _from_payload(_unpack(body))
        self._apply(_Dir.RECV, event, self._check(_Dir.RECV, event))
        return event

    # -- sending -----------------------------------------------------------------------------------

    def send(self, event: Message) -> bytes:
        """Encode one event into bytes to write to the socket.

        Raises LocalProtocolError (and changes nothing) if the event is not allowed now or cannot
        be encoded. If writing the bytes then fails, call :meth:`send_failed`.
        """
        if not isinstance(event, _MESSAGE_TYPES):
            raise LocalProtocolError(f"cannot send {_brief(event)}")
        new_state = self._check(_Dir.SEND, event)
        data = _pack(_to_payload(event), self._max_frame)
        self._apply(_Dir.SEND, event, new_state)
        return data

    def send_failed(self) -> None:
        """Tell the connection a socket write failed: it is dead (state ERROR), nothing more goes.

        Call it and then re-raise the write's exception.
        """
        self._state = State.ERROR
        self._may_send_notice = False

    def new_call_id(self) -> int:
        """A fresh id for our next Call: not among our outstanding calls, increasing, wraps."""
        while True:
            call_id = self._next_id
            self._next_id = call_id + 1 if call_id < MAX_ID else 1
            if call_id not in self._our_calls:
                return call_id

    # -- the state machine -------------------------------------------------------------------------

    def _check(self, direction: _Dir, event: Event) -> State:
        """The state after ``event``, or raise if it is not allowed; changes nothing."""
        error = LocalProtocolError if direction is _Dir.SEND else RemoteProtocolError
        kind = _kind_of(event)
        new_state = _TRANSITIONS.get((self._state, direction, kind))
        verb = "cannot send" if direction is _Dir.SEND else "received"
        if new_state is None or (self._state is State.ERROR and not self._may_send_notice):
            where = "" if new_state is None else " any more"
            raise error(f"{verb} {kind.value} in state {self._state.name}{where}")
        # Ids: ours are the calls this side made, theirs the calls the other side made.
        calls_made, calls_answered = (
            (self._our_calls, self._their_calls)
            if direction is _Dir.SEND
            else (self._their_calls, self._our_calls)
        )
        match event:
            case Call(id=call_id) if call_id in calls_made:
                raise error(f"{verb} a Call with id {call_id}, already outstanding")
            case Reply(id=call_id) | Error(id=call_id) if call_id and call_id not in calls_answered:
                raise error(
                    f"{verb} {kind.value} for id {call_id}, which is not an outstanding call"
                )
        return new_state

    def _apply(self, direction: _Dir, event: Event, new_state: State) -> None:
        sending = direction is _Dir.SEND
        match event:
            case Call(id=call_id):
                (self._our_calls if sending else self._their_calls).add(call_id)
            case Reply(id=call_id) | Error(id=call_id) if call_id:
                (self._their_calls if sending else self._our_calls).discard(call_id)
            case Hello(role=role, name=name) if not sending:
                self._peer_role, self._peer_name = role, name
            case Welcome(version=version):
                self._version = version
            case Error() if self._state is State.ERROR:
                self._may_send_notice = False
        self._state = new_state

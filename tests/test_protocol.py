"""The control protocol codec: two endpoints joined in memory, no sockets; hypothesis fuzzing."""

from __future__ import annotations

import errno
import itertools
import struct
from typing import Any

import msgpack
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from gemfs.control.protocol import (
    MAX_FRAME,
    NEED_DATA,
    PROTOCOL_VERSION,
    Call,
    Connection,
    ConnectionClosed,
    Error,
    Event,
    Hello,
    LocalProtocolError,
    Message,
    Notify,
    RemoteProtocolError,
    Reply,
    State,
    Welcome,
    answer_hello,
    encode_frame,
    errno_code,
    errno_name,
    version_supported,
)

HELLO = Hello(version=PROTOCOL_VERSION, role="driver", name="i915")
WELCOME = Welcome(version=PROTOCOL_VERSION, info={"design": "gemfs", "frames": 4096})


# --------------------------------------------------------------------------------------------------
# helpers


def drain(conn: Connection) -> list[Event]:
    """Every event that the buffered data makes available."""
    events: list[Event] = []
    while (event := conn.next_event()) is not NEED_DATA:
        events.append(event)
        if isinstance(event, ConnectionClosed):
            break
    return events


def feed(conn: Connection, data: bytes) -> list[Event]:
    conn.receive_data(data)
    return drain(conn)


def open_pair(hello: Hello = HELLO) -> tuple[Connection, Connection]:
    """A (peer, server) pair that completed the handshake."""
    peer, server = Connection("peer"), Connection("server")
    assert feed(server, peer.send(hello)) == [hello]
    assert feed(peer, server.send(WELCOME)) == [WELCOME]
    return peer, server


def frame(payload: object) -> bytes:
    """A well-framed body holding any msgpack value (even ones the codec would refuse)."""
    body: bytes = msgpack.packb(payload, use_bin_type=True)
    return struct.pack(">I", len(body)) + body


def remote_error(conn: Connection, data: bytes, match: str) -> None:
    """Feeding ``data`` raises RemoteProtocolError and leaves the connection in ERROR for good."""
    conn.receive_data(data)
    with pytest.raises(RemoteProtocolError, match=match):
        drain(conn)
    assert conn.state is State.ERROR
    with pytest.raises(RemoteProtocolError):
        conn.next_event()


# --------------------------------------------------------------------------------------------------
# handshake


def test_handshake() -> None:
    peer, server = Connection("peer"), Connection("server")
    assert (peer.state, server.state) == (State.SEND_HELLO, State.AWAIT_HELLO)
    assert server.next_event() is NEED_DATA
    assert feed(server, peer.send(HELLO)) == [HELLO]
    assert (peer.state, server.state) == (State.AWAIT_WELCOME, State.SEND_WELCOME)
    assert (server.peer_role, server.peer_name) == ("driver", "i915")
    assert server.version is None
    assert answer_hello(HELLO, WELCOME.info) == WELCOME
    assert feed(peer, server.send(WELCOME)) == [WELCOME]
    assert (peer.state, server.state) == (State.OPEN, State.OPEN)
    assert peer.version == server.version == PROTOCOL_VERSION
    assert peer.peer_role is None


def test_handshake_refused_for_foreign_version() -> None:
    peer, server = Connection("peer"), Connection("server")
    hello = Hello(version=PROTOCOL_VERSION + 1, role="compactor", name="kcompactd")
    assert not version_supported(hello.version)
    assert version_supported(PROTOCOL_VERSION)
    (received,) = feed(server, peer.send(hello))
    assert isinstance(received, Hello)
    answer = answer_hello(received, {})
    assert isinstance(answer, Error)
    assert (answer.id, answer.errno) == (0, "EPROTO")
    assert feed(peer, server.send(answer)) == [answer]
    assert peer.state is server.state is State.CLOSED
    with pytest.raises(LocalProtocolError, match="state CLOSED"):
        peer.send(Call(id=1, op="stats", args={}))
    assert feed(peer, b"") == [ConnectionClosed()]


def test_server_may_refuse_before_hello() -> None:
    peer, server = Connection("peer"), Connection("server")
    busy = Error(id=0, errno="EBUSY", message="shutting down")
    data = server.send(busy)
    peer.send(HELLO)  # crossed on the wire
    assert feed(peer, data) == [busy]
    assert peer.state is State.CLOSED


def test_second_hello_is_a_protocol_error() -> None:
    _peer, server = open_pair()
    remote_error(server, frame({"k": "hello", "v": 1, "role": "driver", "name": "x"}), "Hello")


def test_call_before_handshake_is_a_protocol_error() -> None:
    server = Connection("server")
    remote_error(server, frame({"k": "call", "id": 1, "op": "stats", "a": {}}), "Call in state")


def test_welcome_to_server_is_a_protocol_error() -> None:
    remote_error(Connection("server"), frame({"k": "welcome", "v": 1, "info": {}}), "Welcome")


def test_peer_must_not_receive_before_sending_hello() -> None:
    remote_error(Connection("peer"), frame({"k": "welcome", "v": 1, "info": {}}), "SEND_HELLO")


@pytest.mark.parametrize(
    ("role", "event"),
    [
        ("peer", Call(id=1, op="stats", args={})),
        ("peer", Welcome(version=1, info={})),
        ("peer", Notify(op="x", args={})),
        ("server", HELLO),
        ("server", Call(id=1, op="stats", args={})),
        ("server", Reply(id=1, result=None)),
    ],
)
def test_local_send_before_handshake_refused(role: str, event: Message) -> None:
    conn = Connection("peer" if role == "peer" else "server")
    state = conn.state
    with pytest.raises(LocalProtocolError, match="cannot send"):
        conn.send(event)
    assert conn.state is state


def test_local_second_hello_refused() -> None:
    peer, _ = open_pair()
    with pytest.raises(LocalProtocolError, match="Hello in state OPEN"):
        peer.send(HELLO)


# --------------------------------------------------------------------------------------------------
# calls, replies, errors, notifies


def test_calls_both_directions() -> None:
    peer, server = open_pair()
    compact = Call(id=7, op="compact", args={"order": 9})
    assert feed(server, peer.send(compact)) == [compact]
    assert peer.our_outstanding == server.their_outstanding == {7}

    migrate = Call(
        id=1,
        op="migrate",
        args={"obj": 3, "idx": [0, 1], "src": [10, 11], "dst": [20, 21], "mode": "SYNC"},
    )
    assert feed(peer, server.send(migrate)) == [migrate]
    assert server.our_outstanding == peer.their_outstanding == {1}

    answer = Reply(id=1, result=[0, -errno.EAGAIN])
    assert feed(server, peer.send(answer)) == [answer]
    failure = Error(id=7, errno="EAGAIN", message="GPU busy")
    assert feed(peer, server.send(failure)) == [failure]
    for conn in (peer, server):
        assert conn.our_outstanding == conn.their_outstanding == frozenset()
        assert conn.state is State.OPEN


def test_notify_both_directions() -> None:
    peer, server = open_pair()
    moved = Notify(op="migrated", args={"obj": 3, "idx": [0], "dst": [20], "ok": [True]})
    hint = Notify(op="content_changed", args={"obj": 3, "start": 0, "count": 1})
    assert feed(peer, server.send(moved)) == [moved]
    assert feed(server, peer.send(hint)) == [hint]
    assert peer.our_outstanding == server.our_outstanding == frozenset()


def test_binary_and_nested_values() -> None:
    peer, server = open_pair()
    result = {"frames": b"\x00\xff" * 100, "nested": [{"a": [1, None, 2.5]}], "big": 2**64 - 1}
    call = Call(id=1, op="snapshot", args={})
    assert feed(server, peer.send(call)) == [call]
    assert feed(peer, server.send(Reply(id=1, result=result))) == [Reply(id=1, result=result)]


def test_connection_level_error_closes() -> None:
    peer, server = open_pair()
    peer.send(Call(id=1, op="stats", args={}))
    bye = Error(id=0, errno="ESHUTDOWN", message="unmounting")
    assert feed(peer, server.send(bye)) == [bye]
    assert peer.state is server.state is State.CLOSED
    assert peer.our_outstanding == {1}  # the caller fails these itself
    remote_error(peer, frame({"k": "notify", "op": "x", "a": {}}), "state CLOSED")


def test_new_call_id_skips_outstanding() -> None:
    peer, _server = open_pair()
    peer.send(Call(id=1, op="a", args={}))
    peer.send(Call(id=2, op="a", args={}))
    assert peer.new_call_id() == 3
    assert peer.new_call_id() == 4


def test_pipelined_frames_in_one_chunk() -> None:
    peer, server = open_pair()
    calls = [Call(id=i, op="pin", args={"obj": 1, "start": i, "count": 1}) for i in range(1, 51)]
    data = b"".join(peer.send(c) for c in calls)
    assert feed(server, data) == calls
    assert server.their_outstanding == set(range(1, 51))


def test_one_byte_at_a_time() -> None:
    peer, server = Connection("peer"), Connection("server")
    data = peer.send(HELLO)
    events: list[Event] = []
    for i in range(len(data)):
        events += feed(server, data[i : i + 1])
    assert events == [HELLO]
    peer.receive_data(server.send(WELCOME))
    assert drain(peer) == [WELCOME]
    call = Call(id=5, op="create", args={"path": "/obj", "size": 1 << 20, "migratetype": "MOVABLE"})
    data = peer.send(call) + peer.send(Notify(op="x", args={}))
    events = []
    for i in range(len(data)):
        events += feed(server, data[i : i + 1])
    assert events == [call, Notify(op="x", args={})]


# --------------------------------------------------------------------------------------------------
# EOF


def test_eof_gives_connection_closed_after_buffered_frames() -> None:
    peer, server = open_pair()
    note = Notify(op="bye", args={})
    server.receive_data(peer.send(note))
    server.receive_data(b"")
    assert drain(server) == [note, ConnectionClosed()]
    assert server.state is State.CLOSED
    assert server.next_event() == ConnectionClosed()  # and again
    with pytest.raises(LocalProtocolError, match="after EOF"):
        server.receive_data(b"more")


def test_eof_before_hello() -> None:
    assert feed(Connection("server"), b"") == [ConnectionClosed()]


@pytest.mark.parametrize("cut", [1, 3, 4, 5, -1])
def test_truncated_frame_then_eof(cut: int) -> None:
    peer, server = open_pair()
    data = peer.send(Call(id=1, op="stats", args={"verbose": True}))
    server.receive_data(data[:cut])
    assert server.next_event() is NEED_DATA
    remote_error(server, b"", "EOF inside a frame")


# --------------------------------------------------------------------------------------------------
# malformed input


def test_oversized_length_rejected_before_body() -> None:
    server = Connection("server", max_frame=1024)
    server.receive_data(struct.pack(">I", 1025))  # only the header: no body has arrived
    with pytest.raises(RemoteProtocolError, match="exceeds"):
        server.next_event()
    assert server.state is State.ERROR


def test_default_max_frame_and_largest_frame() -> None:
    assert Connection("server").max_frame == MAX_FRAME == 16 * 1024 * 1024
    peer, server = Connection("peer", max_frame=200), Connection("server", max_frame=200)
    hello = Hello(version=1, role="client", name="x" * 150)
    size = len(encode_frame({"k": "hello", "v": 1, "role": "client", "name": hello.name})) - 4
    assert size <= 200
    assert feed(server, peer.send(hello)) == [hello]
    with pytest.raises(LocalProtocolError, match="exceeds"):
        server.send(Welcome(version=1, info={"pad": "x" * 200}))
    assert server.state is State.SEND_WELCOME


def test_max_frame_must_be_sane() -> None:
    with pytest.raises(ValueError, match="max_frame"):
        Connection("server", max_frame=0)
    with pytest.raises(ValueError, match="max_frame"):
        Connection("server", max_frame=2**32)


def test_garbage_body() -> None:
    remote_error(Connection("server"), b"\x00\x00\x00\x03\xc1\xc1\xc1", "not valid msgpack")


def test_trailing_bytes_in_body() -> None:
    body = msgpack.packb({"k": "hello"}) + b"\x00"
    remote_error(Connection("server"), struct.pack(">I", len(body)) + body, "not valid msgpack")


def test_empty_frame() -> None:
    remote_error(Connection("server"), b"\x00\x00\x00\x00", "not valid msgpack")


def test_payload_not_a_map() -> None:
    remote_error(Connection("server"), frame([1, 2, 3]), "must be a map")


def test_unknown_kind() -> None:
    remote_error(Connection("server"), frame({"k": "teapot"}), "unknown message kind 'teapot'")


def test_missing_kind() -> None:
    remote_error(Connection("server"), frame({"id": 1}), "unknown message kind None")


@pytest.mark.parametrize(
    ("payload", "match"),
    [
        ({"k": "call", "op": "x", "a": {}}, "missing field 'id'"),
        ({"k": "call", "id": "1", "op": "x", "a": {}}, "Call.id must be an int"),
        ({"k": "call", "id": True, "op": "x", "a": {}}, "Call.id must be an int"),
        ({"k": "call", "id": 0, "op": "x", "a": {}}, "Call.id must be in"),
        ({"k": "call", "id": 1, "op": "", "a": {}}, "Call.op must have"),
        ({"k": "call", "id": 1, "op": "x" * 65, "a": {}}, "Call.op must have"),
        ({"k": "call", "id": 1, "op": 5, "a": {}}, "Call.op must be a str"),
        ({"k": "call", "id": 1, "op": "x", "a": [1]}, "Call.args must be a dict"),
        ({"k": "call", "id": 1, "op": "x", "a": {b"bin": 1}}, "keys must be str"),
        ({"k": "reply", "id": 1}, "missing field 'r'"),
        ({"k": "reply", "id": -1, "r": 0}, "Reply.id"),
        ({"k": "error", "id": 1, "e": 11, "m": ""}, "Error.errno must be a str"),
        ({"k": "error", "id": 1, "e": "eagain", "m": ""}, "Error.errno must look like"),
        ({"k": "error", "id": 1, "e": "EAGAIN", "m": None}, "Error.message"),
        ({"k": "notify", "op": None, "a": {}}, "Notify.op"),
        ({"k": "notify", "op": "x"}, "missing field 'a'"),
    ],
)
def test_wrong_fields_after_handshake(payload: dict[str, Any], match: str) -> None:
    peer, _server = open_pair()
    peer.send(Call(id=1, op="stats", args={}))
    remote_error(peer, frame(payload), match)


@pytest.mark.parametrize(
    ("payload", "match"),
    [
        ({"k": "hello", "v": 1, "role": "root", "name": "x"}, "Hello.role"),
        ({"k": "hello", "v": 1, "role": ["driver"], "name": "x"}, "Hello.role"),
        ({"k": "hello", "v": -1, "role": "driver", "name": "x"}, "Hello.version"),
        ({"k": "hello", "v": 1, "role": "driver", "name": ""}, "Hello.name"),
        ({"k": "hello", "v": 1, "role": "driver"}, "missing field 'name'"),
    ],
)
def test_bad_hello(payload: dict[str, Any], match: str) -> None:
    server = Connection("server")
    remote_error(server, frame(payload), match)
    notice = RemoteProtocolError("bad").notice()
    assert (notice.id, notice.errno) == (0, "EPROTO")
    assert server.send(notice).startswith(b"\x00\x00\x00")  # one notice is still allowed...
    with pytest.raises(LocalProtocolError, match="any more"):
        server.send(notice)  # ...but only one


def test_bad_welcome() -> None:
    peer = Connection("peer")
    peer.send(HELLO)
    remote_error(peer, frame({"k": "welcome", "v": 1, "info": {1: 2}}), "not valid msgpack")


def test_unknown_extra_keys_are_ignored() -> None:
    _peer, server = open_pair()
    assert feed(server, frame({"k": "notify", "op": "x", "a": {}, "future": 1})) == [
        Notify(op="x", args={})
    ]


def test_reply_with_unknown_id() -> None:
    peer, _server = open_pair()
    peer.send(Call(id=1, op="stats", args={}))
    remote_error(peer, frame({"k": "reply", "id": 2, "r": None}), "not an outstanding call")


def test_error_with_unknown_id() -> None:
    peer, _server = open_pair()
    remote_error(peer, frame({"k": "error", "id": 9, "e": "EIO", "m": ""}), "not an outstanding")


def test_duplicate_incoming_call_id() -> None:
    peer, server = open_pair()
    server.receive_data(peer.send(Call(id=4, op="stats", args={})))
    assert server.next_event() == Call(id=4, op="stats", args={})
    remote_error(server, frame({"k": "call", "id": 4, "op": "stats", "a": {}}), "already")


def test_reply_is_consumed_once() -> None:
    peer, server = open_pair()
    data = peer.send(Call(id=1, op="stats", args={}))
    feed(server, data)
    reply = frame({"k": "reply", "id": 1, "r": 0})
    assert feed(peer, reply) == [Reply(id=1, result=0)]
    remote_error(peer, reply, "not an outstanding call")


def test_error_state_is_sticky_and_drops_data() -> None:
    server = Connection("server")
    remote_error(server, b"\xff\xff\xff\xff", "exceeds")
    server.receive_data(frame({"k": "hello", "v": 1, "role": "driver", "name": "x"}))
    with pytest.raises(RemoteProtocolError, match="ERROR state"):
        server.next_event()
    with pytest.raises(LocalProtocolError, match="state ERROR"):
        server.send(WELCOME)


# --------------------------------------------------------------------------------------------------
# local errors


def test_local_reply_rules() -> None:
    peer, server = open_pair()
    with pytest.raises(LocalProtocolError, match="not an outstanding call"):
        server.send(Reply(id=1, result=None))
    feed(server, peer.send(Call(id=1, op="stats", args={})))
    server.send(Reply(id=1, result=None))
    with pytest.raises(LocalProtocolError, match="not an outstanding call"):
        server.send(Reply(id=1, result=None))
    with pytest.raises(LocalProtocolError, match="not an outstanding call"):
        server.send(Error(id=1, errno="EIO", message="twice"))


def test_local_duplicate_call_id() -> None:
    peer, _server = open_pair()
    peer.send(Call(id=3, op="stats", args={}))
    with pytest.raises(LocalProtocolError, match="already outstanding"):
        peer.send(Call(id=3, op="stats", args={}))
    assert peer.our_outstanding == {3}


@pytest.mark.parametrize(
    ("value", "match"),
    [
        (object(), "cannot be encoded"),
        ({1: "int key"}, "map keys must be str or bytes"),
        ([[{(1, 2): 0}]], "map keys must be str or bytes"),
        ("\ud800", "cannot be encoded"),
        (2**64, "cannot be encoded"),
    ],
)
def test_local_unencodable_values(value: object, match: str) -> None:
    peer, _server = open_pair()
    with pytest.raises(LocalProtocolError, match=match):
        peer.send(Call(id=1, op="x", args={"v": value}))
    assert peer.our_outstanding == frozenset()  # nothing changed
    assert peer.state is State.OPEN


def test_local_too_deep() -> None:
    peer, _server = open_pair()
    value: list[Any] = []
    for _ in range(300):
        value = [value]
    with pytest.raises(LocalProtocolError, match="nested deeper"):
        peer.send(Notify(op="x", args={"v": value}))


def test_cannot_send_non_events() -> None:
    peer, _server = open_pair()
    with pytest.raises(LocalProtocolError, match="cannot send"):
        peer.send(ConnectionClosed())  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("cls", "fields", "match"),
    [
        (Hello, {"version": 1, "role": "kernel", "name": "x"}, "Hello.role"),
        (Hello, {"version": 1.0, "role": "driver", "name": "x"}, "Hello.version"),
        (Hello, {"version": 1, "role": "driver", "name": "x" * 257}, "Hello.name"),
        (Welcome, {"version": 1, "info": []}, "Welcome.info"),
        (Call, {"id": 0, "op": "x", "args": {}}, "Call.id"),
        (Call, {"id": 2**63, "op": "x", "args": {}}, "Call.id"),
        (Call, {"id": False, "op": "x", "args": {}}, "Call.id"),
        (Call, {"id": 1, "op": "", "args": {}}, "Call.op"),
        (Call, {"id": 1, "op": "x", "args": {1: 2}}, "Call.args keys"),
        (Reply, {"id": 0, "result": None}, "Reply.id"),
        (Error, {"id": -1, "errno": "EIO", "message": ""}, "Error.id"),
        (Error, {"id": 1, "errno": "EIO!", "message": ""}, "Error.errno"),
        (Error, {"id": 1, "errno": "EIO", "message": b"bytes"}, "Error.message"),
        (Notify, {"op": "x" * 65, "args": {}}, "Notify.op"),
        (Notify, {"op": "x", "args": None}, "Notify.args"),
    ],
)
def test_invalid_events_cannot_be_built(
    cls: type[Message], fields: dict[str, Any], match: str
) -> None:
    with pytest.raises(LocalProtocolError, match=match):
        cls(**fields)


def test_send_failed() -> None:
    peer, _server = open_pair()
    peer.send(Call(id=1, op="stats", args={}))
    peer.send_failed()
    assert peer.state is State.ERROR
    with pytest.raises(LocalProtocolError):
        peer.send(Notify(op="x", args={}))
    with pytest.raises(LocalProtocolError):
        peer.send(Error(id=0, errno="EIO", message="no notice after a failed write"))
    with pytest.raises(RemoteProtocolError):
        peer.next_event()


def test_bad_role() -> None:
    with pytest.raises(ValueError, match="our_role"):
        Connection("client")  # type: ignore[arg-type]


# --------------------------------------------------------------------------------------------------
# helpers: frames and errno names


def test_encode_frame() -> None:
    data = encode_frame({"k": "notify", "op": "x", "a": {}})
    assert int.from_bytes(data[:4], "big") == len(data) - 4
    assert msgpack.unpackb(data[4:]) == {"k": "notify", "op": "x", "a": {}}
    with pytest.raises(LocalProtocolError, match="exceeds"):
        encode_frame({"pad": "x" * 100}, max_frame=50)


def test_errno_names() -> None:
    assert errno_name(errno.EAGAIN) == errno_name(-errno.EAGAIN) == "EAGAIN"
    assert errno_name(errno.EDEADLK) == "EDEADLK"
    assert errno_name(errno.EOPNOTSUPP) == "EOPNOTSUPP"
    assert errno_code("EAGAIN") == errno_code("EWOULDBLOCK") == errno.EAGAIN
    assert errno_code("EPROTO") == errno.EPROTO
    assert errno_name(4000) == "E4000"
    assert errno_code("E4000") == 4000
    for name in ("EFOO", "errno", "E", "EINVALX", "__name__"):
        with pytest.raises(ValueError, match="unknown errno"):
            errno_code(name)
    for code in errno.errorcode:
        name = errno_name(code)
        assert errno_code(name) == code
        Error(id=1, errno=name, message="")  # every name is a valid Error.errno


# --------------------------------------------------------------------------------------------------
# hypothesis: round trips and fuzzing

scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**63), max_value=2**64 - 1)
    | st.floats(allow_nan=False)
    | st.text(max_size=20)
    | st.binary(max_size=20)
)
values = st.recursive(
    scalars,
    lambda inner: (
        st.lists(inner, max_size=5)
        | st.dictionaries(st.text(max_size=8) | st.binary(max_size=8), inner, max_size=5)
    ),
    max_leaves=20,
)
str_maps = st.dictionaries(st.text(max_size=10), values, max_size=5)
small_maps = st.dictionaries(
    st.sampled_from(["obj", "start", "count", "idx"]),
    st.integers(0, 2**20) | st.lists(st.integers(0, 2**20), max_size=4),
    max_size=3,
)
ops = st.text(min_size=1, max_size=64)
ids = st.integers(min_value=1, max_value=2**63 - 1)
errnos = st.sampled_from(sorted(errno.errorcode.values())) | st.from_regex(
    r"E[A-Z0-9]{1,31}", fullmatch=True
)


def chunked(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(data) + 1) for c in cuts} | {0, len(data)})
    return [data[a:b] for a, b in itertools.pairwise(points)]


@settings(max_examples=100, deadline=None)
@given(
    version=st.integers(0, 2**32 - 1),
    role=st.sampled_from(["driver", "compactor", "client"]),
    name=st.text(min_size=1, max_size=256),
    info=str_maps,
    cuts=st.lists(st.integers(0, 10_000), max_size=8),
)
def test_handshake_round_trip(
    version: int, role: str, name: str, info: dict[str, Any], cuts: list[int]
) -> None:
    peer, server = Connection("peer"), Connection("server")
    hello = Hello(version=version, role=role, name=name)
    welcome = Welcome(version=version, info=info)
    events: list[Event] = []
    for piece in chunked(peer.send(hello), cuts):
        events += feed(server, piece)
    assert events == [hello]
    events = []
    for piece in chunked(server.send(welcome), cuts):
        events += feed(peer, piece)
    assert events == [welcome]
    assert server.peer_role == role


@st.composite
def conversations(draw: st.DrawFn) -> tuple[list[Message], list[Message]]:
    """Calls and notifies from the peer, then answers from the server to some of them."""
    call_ids = draw(st.lists(ids, unique=True, max_size=8))
    outgoing: list[Message] = [
        Call(id=call_id, op=draw(ops), args=draw(str_maps)) for call_id in call_ids
    ]
    outgoing += draw(st.lists(st.builds(Notify, op=ops, args=str_maps), max_size=3))
    outgoing = draw(st.permutations(outgoing))
    answered = draw(st.lists(st.sampled_from(call_ids), unique=True)) if call_ids else []
    answers: list[Message] = [
        draw(
            st.builds(Reply, id=st.just(i), result=values)
            | st.builds(Error, id=st.just(i), errno=errnos, message=st.text(max_size=30))
        )
        for i in answered
    ]
    return outgoing, answers


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(conversation=conversations(), cuts=st.lists(st.integers(0, 100_000), max_size=12))
def test_round_trip_chunked(
    conversation: tuple[list[Message], list[Message]], cuts: list[int]
) -> None:
    outgoing, answers = conversation
    peer, server = open_pair()
    received: list[Event] = []
    for piece in chunked(b"".join(peer.send(e) for e in outgoing), cuts):
        received += feed(server, piece)
    assert received == outgoing
    received = []
    for piece in chunked(b"".join(server.send(e) for e in answers), cuts):
        received += feed(peer, piece)
    assert received == answers
    unanswered = {e.id for e in outgoing if isinstance(e, Call)} - {
        e.id for e in answers if isinstance(e, Reply | Error)
    }
    assert peer.our_outstanding == server.their_outstanding == unanswered


def only_remote_errors(conn: Connection, pieces: list[bytes], eof: bool) -> None:
    """Feed pieces; the only exception allowed out of the codec is RemoteProtocolError."""
    try:
        for piece in [*pieces, b""] if eof else pieces:
            conn.receive_data(piece)
            drain(conn)
    except RemoteProtocolError:
        assert conn.state is State.ERROR
        with pytest.raises(RemoteProtocolError):
            conn.next_event()


@settings(max_examples=300, deadline=None)
@given(
    data=st.binary(max_size=200), cuts=st.lists(st.integers(0, 200), max_size=5), eof=st.booleans()
)
def test_fuzz_fresh_server_with_bytes(data: bytes, cuts: list[int], eof: bool) -> None:
    only_remote_errors(Connection("server", max_frame=1024), chunked(data, cuts), eof)


@settings(max_examples=200, deadline=None)
@given(data=st.binary(max_size=200), eof=st.booleans())
def test_fuzz_open_connection_with_framed_bytes(data: bytes, eof: bool) -> None:
    """Random bodies behind a correct length header reach the msgpack decoder."""
    for conn in open_pair():
        only_remote_errors(conn, [struct.pack(">I", len(data)) + data], eof)


payload_keys = st.sampled_from(["k", "v", "role", "name", "info", "id", "op", "a", "r", "e", "m"])
kinds = st.sampled_from(["hello", "welcome", "call", "reply", "error", "notify", "x"])
payloads = st.dictionaries(payload_keys, kinds | st.integers(-2, 3) | values | str_maps, max_size=5)


@settings(max_examples=200, deadline=None)
@given(
    payload=payloads,
    kind=kinds,
    side=st.sampled_from(["fresh_server", "fresh_peer", "open_peer", "open_server"]),
)
def test_fuzz_structured_payloads(payload: dict[str, Any], kind: str, side: str) -> None:
    """Maps that look almost like messages, to exercise every field check."""
    payload = {"k": kind, **payload} if "k" not in payload else payload
    if side == "fresh_server":
        conn = Connection("server")
    elif side == "fresh_peer":
        conn = Connection("peer")
        conn.send(HELLO)
    else:
        peer, server = open_pair()
        peer.send(Call(id=1, op="x", args={}))
        feed(peer, server.send(Call(id=2, op="y", args={})))
        conn = peer if side == "open_peer" else server
    only_remote_errors(conn, [frame(payload)], eof=False)


simple_messages = st.lists(
    st.builds(Call, id=st.integers(1, 2**40), op=st.sampled_from(["pin", "unpin"]), args=small_maps)
    | st.builds(Notify, op=st.sampled_from(["migrated"]), args=small_maps),
    min_size=1,
    max_size=4,
    unique_by=lambda e: e.id if isinstance(e, Call) else -id(e),  # call ids unique
)


@settings(max_examples=200, deadline=None)
@given(
    messages=simple_messages,
    flips=st.lists(st.tuples(st.integers(0, 10_000), st.integers(1, 255)), min_size=1, max_size=4),
    eof=st.booleans(),
)
def test_fuzz_mutated_streams(
    messages: list[Message], flips: list[tuple[int, int]], eof: bool
) -> None:
    """Valid streams with a few bytes flipped: caught as protocol errors or decoded as events."""
    peer, server = open_pair()
    data = bytearray(b"".join(peer.send(e) for e in messages))
    for position, mask in flips:
        data[position % len(data)] ^= mask
    only_remote_errors(server, [bytes(data)], eof)


# --------------------------------------------------------------------------------------------------
# hypothesis: stateful exchange of calls and replies between two endpoints

SIDES = ("peer", "server")


class CallExchange(RuleBasedStateMachine):
    """Random calls, answers and notifies both ways, delivered in random slices.

    The model tracks, for each side, the calls it made that are still unanswered *as it knows*
    (a reply in flight does not count yet) and the calls it received and still owes an answer to.
    """

    def __init__(self) -> None:
        super().__init__()
        peer, server = open_pair()
        self.conn = {"peer": peer, "server": server}
        self.wire = {side: b"" for side in SIDES}  # bytes sent by side, not yet delivered
        self.in_flight: dict[str, list[Message]] = {side: [] for side in SIDES}
        self.calls_made: dict[str, set[int]] = {side: set() for side in SIDES}
        self.owed: dict[str, set[int]] = {side: set() for side in SIDES}

    def other(self, side: str) -> str:
        return "server" if side == "peer" else "peer"

    def send(self, side: str, event: Message) -> None:
        self.wire[side] += self.conn[side].send(event)
        self.in_flight[side].append(event)

    @rule(
        side=st.sampled_from(SIDES),
        op=ops,
        args=small_maps,
        fresh=st.booleans(),
        n=st.integers(1, 8),
    )
    def call(self, side: str, op: str, args: dict[str, Any], fresh: bool, n: int) -> None:
        call_id = self.conn[side].new_call_id() if fresh else n
        event = Call(id=call_id, op=op, args=args)
        if call_id in self.calls_made[side]:
            with pytest.raises(LocalProtocolError, match="already outstanding"):
                self.conn[side].send(event)
        else:
            self.send(side, event)
            self.calls_made[side].add(call_id)

    @precondition(lambda self: any(self.owed.values()))
    @rule(data=st.data(), ok=st.booleans())
    def answer(self, data: st.DataObject, ok: bool) -> None:
        side = data.draw(st.sampled_from([side for side in SIDES if self.owed[side]]))
        call_id = data.draw(st.sampled_from(sorted(self.owed[side])))
        if ok:
            self.send(side, Reply(id=call_id, result=data.draw(small_maps)))
        else:
            self.send(side, Error(id=call_id, errno="EAGAIN", message="retry"))
        self.owed[side].remove(call_id)

    @rule(side=st.sampled_from(SIDES), call_id=st.integers(1, 2**63 - 1), ok=st.booleans())
    def bogus_answer(self, side: str, call_id: int, ok: bool) -> None:
        if call_id in self.owed[side]:
            return
        event: Message = (
            Reply(id=call_id, result=None) if ok else Error(id=call_id, errno="EIO", message="")
        )
        with pytest.raises(LocalProtocolError, match="not an outstanding call"):
            self.conn[side].send(event)

    @rule(side=st.sampled_from(SIDES), op=ops, args=small_maps)
    def notify(self, side: str, op: str, args: dict[str, Any]) -> None:
        self.send(side, Notify(op=op, args=args))

    @rule(side=st.sampled_from(SIDES), data=st.data())
    def deliver(self, side: str, data: st.DataObject) -> None:
        """Deliver a random prefix of what ``side`` sent to the other end."""
        wire = self.wire[side]
        n = data.draw(st.integers(0, len(wire)))
        piece, self.wire[side] = wire[:n], wire[n:]
        self.receive(self.other(side), piece)

    def receive(self, side: str, piece: bytes) -> None:
        if piece:
            self.conn[side].receive_data(piece)
        sender = self.other(side)
        for event in drain(self.conn[side]):
            assert event == self.in_flight[sender].pop(0)
            match event:
                case Call(id=call_id):
                    self.owed[side].add(call_id)
                case Reply(id=call_id) | Error(id=call_id):
                    self.calls_made[side].remove(call_id)

    @invariant()
    def bookkeeping_matches_model(self) -> None:
        for side in SIDES:
            conn = self.conn[side]
            assert conn.state is State.OPEN
            assert conn.our_outstanding == self.calls_made[side]
            assert conn.their_outstanding == self.owed[side]

    def teardown(self) -> None:
        """Everything still on the wire arrives intact, then both sides see EOF."""
        for side in SIDES:
            self.receive(self.other(side), self.wire[side])
            assert self.in_flight[side] == []
        self.bookkeeping_matches_model()
        for side in SIDES:
            assert feed(self.conn[side], b"") == [ConnectionClosed()]


CallExchange.TestCase.settings = settings(max_examples=60, stateful_step_count=30, deadline=None)
TestCallExchange = CallExchange.TestCase

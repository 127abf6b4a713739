"""Message: validated at the edge, cheap envelopes for handlers."""

from __future__ import annotations

import pickle
import time

import pydantic
import pytest

from sage_ray_comm import CommunicationPattern, Message, MessageType
from sage_ray_comm._wire import OP_CALL, OP_EVENT, Request
from sage_ray_comm.message import envelope, new_message_id


def test_defaults_and_ids():
    a, b = Message(), Message()
    assert a.type is MessageType.REQUEST and a.id != b.id and a.headers == {}
    assert abs(a.timestamp - time.time()) < 60
    assert len({new_message_id() for _ in range(1000)}) == 1000


def test_types_are_validated():
    assert Message(type="event").type is MessageType.EVENT
    with pytest.raises(pydantic.ValidationError, match="type"):
        Message(type="nonsense")
    with pytest.raises(pydantic.ValidationError, match="headers"):
        Message(headers={"a": object()})
    with pytest.raises(pydantic.ValidationError, match="ttl"):
        Message(ttl=-1)
    with pytest.raises(pydantic.ValidationError, match=r"unknown_field|extra"):
        Message(unknown_field=1)


def test_expiry_takes_the_earlier_of_ttl_and_deadline():
    m = Message(timestamp=100.0, ttl=5.0, deadline=103.0)
    assert m.expires_at == 103.0 and m.is_expired(now=103.5) and not m.is_expired(now=102.0)
    assert Message(timestamp=100.0, ttl=5.0).expires_at == 105.0
    assert Message().expires_at is None and not Message().is_expired()


def test_messages_pickle():
    m = Message(type=MessageType.EVENT, sender="s", payload={"x": [1, 2]}, headers={"k": "v"})
    assert pickle.loads(pickle.dumps(m)) == m


def test_envelope_of_a_request():
    req = Request(OP_CALL, 7, "add", (41,), None, "rep.1.x", 123.0, "client-1", {"trace": 9}, "calc")
    m = envelope(req)
    assert (m.type, m.sender, m.receiver, m.function, m.payload) == (MessageType.REQUEST, "client-1", "calc", "add", 41)
    assert m.correlation_id == "7" and m.deadline == 123.0 and m.headers == {"trace": "9"}
    ev = envelope(Request(OP_EVENT, 0, "@event:x", ({"t": 1},), None, None, None, "pub", {"topic": "a.b"}, "mon"))
    assert ev.type is MessageType.EVENT and ev.topic == "a.b" and ev.payload == {"t": 1}


def test_several_arguments_make_a_tuple_payload():
    m = envelope(Request(OP_CALL, 1, "add", (1, 2), None, None, None, None, None, "calc"))
    assert m.payload == (1, 2)


def test_patterns_cover_the_four_and_streams():
    assert {p.value for p in CommunicationPattern} == {
        "request_response",
        "point_to_point",
        "publish_subscribe",
        "load_balanced",
        "stream",
    }

"""Topics and subscription patterns (NATS subjects), without Ray."""

from __future__ import annotations

import pytest

from sage_ray_comm import InvalidSubscription
from sage_ray_comm.topics import topic_matches, validate_pattern, validate_topic


@pytest.mark.parametrize(
    "pattern,topic,expected",
    [
        ("a.b.c", "a.b.c", True),
        ("a.b.c", "a.b", False),
        ("a.b", "a.b.c", False),
        ("a.*.c", "a.x.c", True),
        ("a.*.c", "a.x.y.c", False),
        ("*", "a", True),
        ("*", "a.b", False),
        ("a.>", "a.b", True),
        ("a.>", "a.b.c.d", True),
        ("a.>", "a", False),
        (">", "a.b", True),
        ("*.b.>", "x.b.c", True),
        ("*.b.>", "x.c.c", False),
        ("sensor.*", "sensor.kitchen", True),
        ("sensor.*", "sensors.kitchen", False),
    ],
)
def test_nats_matching(pattern, topic, expected):
    assert topic_matches(pattern, topic) is expected


@pytest.mark.parametrize("bad", ["", "a..b", "a.>.b", "a.b>", "a b", ">x", 3])
def test_bad_patterns_are_typed_errors(bad):
    with pytest.raises(InvalidSubscription):
        validate_pattern(bad)


@pytest.mark.parametrize("bad", ["", "a.*", "a.>", "a..b", "a b", None])
def test_publish_topics_take_no_wildcards(bad):
    with pytest.raises(InvalidSubscription):
        validate_topic(bad)

"""Topics and subscription patterns, as NATS subjects: dot-separated tokens;
in a pattern, ``*`` matches exactly one token and a final ``>`` one or more.
Pure logic: the router's registry and the clients' routing both use it.

>>> topic_matches("sensor.*.temp", "sensor.kitchen.temp"), topic_matches("sensor.>", "sensor")
(True, False)
"""

from __future__ import annotations

import re

from .errors import InvalidSubscription

__all__ = ["topic_matches", "validate_pattern", "validate_topic"]

_TOKEN = re.compile(r"^[^.*>\s]+$")


def validate_topic(topic: str) -> str:
    """A publish subject: dot-separated tokens, no wildcards."""
    if not isinstance(topic, str) or not topic or not all(_TOKEN.match(t) for t in topic.split(".")):
        raise InvalidSubscription(
            f"topic must be dot-separated non-empty tokens without '*', '>' or spaces, got {topic!r}"
        )
    return topic


def validate_pattern(pattern: str) -> str:
    """A subscription pattern: tokens, ``*`` for exactly one token, a final ``>`` for one or more."""
    if not isinstance(pattern, str) or not pattern:
        raise InvalidSubscription(f"subscription pattern must be a non-empty string, got {pattern!r}")
    toks = pattern.split(".")
    for i, t in enumerate(toks):
        if t == "*" or (t == ">" and i == len(toks) - 1) or _TOKEN.match(t):
            continue
        raise InvalidSubscription(
            f"bad subscription pattern {pattern!r}: token {i + 1} ({t!r}) must be a word, '*', or a final '>'"
        )
    return pattern


def topic_matches(pattern: str, topic: str) -> bool:
    """NATS subject matching: ``*`` matches one token, a final ``>`` one or more.

    >>> [topic_matches(p, "a.b.c") for p in ("a.b.c", "a.*.c", "a.>", "*.b", "a.b.c.>")]
    [True, True, True, False, False]
    """
    p = pattern.split(".")
    t = topic.split(".")
    for i, tok in enumerate(p):
        if tok == ">":
            return len(t) > i
        if i >= len(t) or (tok != "*" and tok != t[i]):
            return False
    return len(p) == len(t)

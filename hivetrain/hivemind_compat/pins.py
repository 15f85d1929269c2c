"""Each hivemind method this package copies or overrides, pinned to the source it was written against.

``@follows(owner, name, sha)`` next to an override records that it copies, replaces or relies on
``owner.name`` as hivemind 1.1.12 wrote it: ``sha`` is the first 16 hex digits of the SHA-256 of
that method's source (``inspect.getsource``). Importing the package only checks that the hooks
exist (``check_hivemind``); tests/test_hivemind_compat.py checks every pin (``moved_pins``), so a
hivemind release that changed a method we depend on fails there, naming the override to re-read.
"""

from __future__ import annotations

import hashlib
import inspect
from dataclasses import dataclass
from typing import Callable, TypeVar

F = TypeVar("F", bound=Callable)


@dataclass(frozen=True)
class Pin:
    """``where`` (our override) follows ``owner.name``, whose source hashed to ``sha``."""

    owner: type
    name: str
    sha: str
    where: str


#: Every pin recorded by the modules of this package (filled as they are imported).
PINS: list[Pin] = []


def source_sha(owner: type, name: str) -> str:
    """The first 16 hex digits of the SHA-256 of ``owner.name``'s source (a method, classmethod or property)."""
    found = inspect.getattr_static(owner, name)
    found = getattr(found, "__func__", found)  # a classmethod or staticmethod: its function
    if isinstance(found, property):
        found = found.fget
    return hashlib.sha256(inspect.getsource(found).encode()).hexdigest()[:16]


def follows(owner: type, name: str, sha: str) -> Callable[[F], F]:
    """Record that the decorated override follows ``owner.name`` of the hivemind release it was written for."""

    def record(function: F) -> F:
        PINS.append(Pin(owner, name, sha, function.__qualname__))
        return function

    return record


def moved_pins(pins: list[Pin] | None = None) -> list[str]:
    """What each pin whose hivemind source changed says to re-read; empty when every pin holds."""
    return [
        f"{pin.where} follows {pin.owner.__qualname__}.{pin.name}, whose source changed "
        f"(sha {source_sha(pin.owner, pin.name)}, written against {pin.sha}): re-read the override"
        for pin in (PINS if pins is None else pins)
        if source_sha(pin.owner, pin.name) != pin.sha
    ]

"""Crash-test events of gallery writes, shared by every backend: each write reports where it is
(``<call> <point> <n>`` lines appended to the file :data:`EVENTS_ENV` names), and a process told to
stop at one (:data:`STOP_ENV`) waits there for the test's SIGKILL. A kill lands at a defined point
however loaded the machine is, where a kill timed by a clock may land anywhere."""

from __future__ import annotations

import os
import time
from collections import Counter

EVENTS_ENV = "BCTKIT_GALLERY_EVENTS"
"""Environment variable: a file to which every write transaction appends its events, one line each
(``<call> <point> <n>``: the n-th time this process reached that point of that call), for tests."""
STOP_ENV = "BCTKIT_GALLERY_STOP"
"""Environment variable: an event line (e.g. ``add written 3``) at which the process, once it has
reported it, stops and waits to be killed (tests only; needs :data:`EVENTS_ENV`)."""
_seen: Counter[tuple[str, str]] = Counter()


def event(call: str, point: str) -> None:
    """Report that this process reached ``point`` of a ``call`` transaction (see the module
    docstring); without :data:`EVENTS_ENV` set this is one dictionary lookup."""
    path = os.environ.get(EVENTS_ENV)
    if not path:
        return
    _seen[call, point] += 1
    line = f"{call} {point} {_seen[call, point]}"
    with open(path, "a", encoding="utf-8") as fh:
        fh.write(line + "\n")
    while os.environ.get(STOP_ENV) == line:  # wait here for the test's SIGKILL
        time.sleep(1.0)

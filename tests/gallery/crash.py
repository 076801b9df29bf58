"""Kill a process at a defined point of a gallery store transaction (the store's test events, see
:mod:`bctkit.gallery.events`), not after a time: the same point however loaded the machine is."""

import contextlib
import os
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

from bctkit.gallery.events import EVENTS_ENV, STOP_ENV

ROOT = Path(__file__).resolve().parents[2]


@contextlib.contextmanager
def stopped_at(cmd: list[str], stop: str, scratch: Path, group: bool = False) -> Iterator[list[str]]:
    """Run ``cmd`` until it reports the store event ``stop`` (e.g. ``"add written 3"``), where it
    waits; yields the events it reported, then SIGKILLs it (``group``: with every process it started,
    e.g. torchrun and its workers, which torchrun starts in sessions of their own). Fails when it
    exits before ``stop``."""
    scratch.mkdir(parents=True, exist_ok=True)
    n = len(list(scratch.glob("events-*")))
    events, log = scratch / f"events-{n}", scratch / f"stderr-{n}"
    env = {**os.environ, EVENTS_ENV: str(events), STOP_ENV: stop}
    with open(log, "wb") as err:
        proc = subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=err)
    try:
        deadline = time.monotonic() + 600  # a hang guard only: the kill waits for the event
        while True:
            seen = events.read_text().splitlines() if events.exists() else []
            if stop in seen:
                break
            assert proc.poll() is None, f"exited ({proc.returncode}) before {stop!r}: " \
                                        f"{seen[-3:]} {log.read_text()[-1500:]}"
            assert time.monotonic() < deadline, f"no {stop!r} event"
            time.sleep(0.01)
        yield seen
        assert proc.poll() is None, "left its stop"
        tree = [proc.pid, *(_descendants(proc.pid) if group else [])]
        for pid in tree:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        assert proc.wait() == -signal.SIGKILL
        for pid in tree[1:]:  # gone (their locks with them) before the caller starts another
            _wait_gone(pid)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def kill_at(cmd: list[str], stop: str, scratch: Path, group: bool = False) -> list[str]:
    """Run ``cmd`` and SIGKILL it once it reports the store event ``stop``; the events it reported."""
    with stopped_at(cmd, stop, scratch, group) as seen:
        return seen


def _descendants(pid: int) -> list[int]:
    """Every live process descended from ``pid`` (read from /proc), parents before children."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError, ValueError, IndexError):
            fields = stat.read_text().rsplit(")", 1)[1].split()
            children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    out, todo = [], [pid]
    while todo:
        kids = children.get(todo.pop(), [])
        out += kids
        todo += kids
    return out


def _wait_gone(pid: int, timeout_s: float = 120.0) -> None:
    """Wait until process ``pid`` has exited with all its threads (its files and locks released):
    gone, or a zombie of one thread (a thread group's leader turns zombie while its other threads
    are still exiting, and the files they share close only when the last one has)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            status = dict(ln.split(":", 1) for ln in Path(f"/proc/{pid}/status").read_text().splitlines()
                          if ":" in ln)
        except OSError:
            return
        state, threads = status.get("State", "").strip(), status.get("Threads", "").strip()
        if state.startswith(("Z", "X")) and threads == "1":
            return
        time.sleep(0.01)
    raise AssertionError(f"process {pid} has not exited {timeout_s:g} s after SIGKILL")

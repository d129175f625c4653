"""Find and stop local processes through /proc (Linux): Flower's daemons outlive their shells."""

from __future__ import annotations

import contextlib
import os
import signal
import time
from collections.abc import Iterable, Iterator
from pathlib import Path


def children(pid: int) -> list[int]:
    """All descendants of ``pid`` that are still attached to it, depth first."""
    try:
        text = Path(f"/proc/{pid}/task/{pid}/children").read_text()
    except OSError:
        return []
    kids = [int(p) for p in text.split()]
    return kids + [g for k in kids for g in children(k)]


def _read_each(name: str) -> Iterator[tuple[int, bytes]]:
    """(pid, bytes of /proc/<pid>/<name>) for every live process we may read."""
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            data = (entry / name).read_bytes()
        except OSError:
            continue
        if alive(int(entry.name)):
            yield int(entry.name), data


def cmdline_pids(*needles: str) -> list[tuple[int, str]]:
    """(pid, command line) of live processes whose command line contains every needle."""
    found = []
    for pid, raw in _read_each("cmdline"):
        cmdline = raw.replace(b"\0", b" ").decode(errors="replace")
        if all(needle in cmdline for needle in needles):
            found.append((pid, cmdline))
    return found


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def terminate(
    pids: Iterable[int],
    grace: float = 5.0,
    signals: tuple[signal.Signals, ...] = (signal.SIGTERM, signal.SIGKILL),
) -> None:
    """SIGTERM ``pids`` (and their descendants), then SIGKILL what is left after ``grace``.

    ``signals=(signal.SIGKILL,)`` is ``kill -9``: no process gets to clean up.
    """
    everything = list(dict.fromkeys(p for pid in pids for p in (pid, *children(pid))))
    for sig in signals:
        for pid in [p for p in everything if alive(p)]:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, sig)
        deadline = time.monotonic() + grace
        while time.monotonic() < deadline and any(alive(p) for p in everything):
            time.sleep(0.1)


def pids_with_env(name: str, value: str) -> list[int]:
    """Live processes whose environment has ``name=value`` (what a run spawns inherits it)."""
    needle = f"{name}={value}".encode()
    return [pid for pid, environ in _read_each("environ") if needle in environ.split(b"\0")]


def proportional_memory(pids: Iterable[int]) -> int:
    """Bytes of memory the processes use, shared pages split between sharers (PSS), summed."""
    total = 0
    for pid in pids:
        try:
            for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
                if line.startswith("Pss:"):
                    total += int(line.split()[1]) * 1024
                    break
        except OSError:
            continue
    return total

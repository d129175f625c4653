"""retain_freed_memory: freed heap memory stays mapped, so the next step does not re-fault it."""

from __future__ import annotations

import platform
import subprocess
import sys

import pytest

# Allocate 50 x 4 MiB, touch every page, free it all; report how much of the resident growth
# the process still holds afterwards.
PROBE = """
import resource, sys, torch
from lowprec_fl.task.allocator import retain_freed_memory
if sys.argv[1] == "retain":
    assert retain_freed_memory()
def resident_mib():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2**20
before = resident_mib()
blocks = [torch.ones(1 << 20) for _ in range(50)]
grown = resident_mib() - before
del blocks
print(round((resident_mib() - before) / grown, 3))
"""


def _kept_fraction(mode: str) -> float:
    out = subprocess.run(
        [sys.executable, "-c", PROBE, mode], capture_output=True, text=True, check=True
    )
    return float(out.stdout.strip())


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="a glibc allocator setting")
def test_freed_tensors_stay_mapped_only_when_retained() -> None:
    assert _kept_fraction("retain") > 0.9  # the next step reuses these pages
    assert _kept_fraction("default") < 0.1  # glibc handed them back to the kernel

"""Finding a run's processes by their environment and summing their memory (scale benchmark)."""

from __future__ import annotations

import os
import select
import subprocess
import sys
import uuid

from scripts.processes import pids_with_env, proportional_memory

#: Generous: a loaded machine may take many seconds to start Python and fill the pages.
DEADLINE_S = 120.0


def test_processes_are_found_by_an_inherited_variable_and_their_memory_summed() -> None:
    tag = uuid.uuid4().hex
    env = dict(os.environ, LOWPREC_TEST_TAG=tag)
    # a child that fills ~40 MB (touched pages count), says so, and waits
    code = 'import sys; b = b"x" * 40_000_000; print("ready", flush=True); sys.stdin.read()'
    child = subprocess.Popen(
        [sys.executable, "-c", code], env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE
    )
    try:
        # Wait for the child's own signal that its memory is filled, not for a fixed time.
        ready, _, _ = select.select([child.stdout], [], [], DEADLINE_S)
        assert ready, f"the child did not start within {DEADLINE_S:.0f} s"
        assert child.stdout.readline() == b"ready\n"
        # Its environment and memory are in /proc from now on: no waiting needed.
        found = pids_with_env("LOWPREC_TEST_TAG", tag)
        assert found == [child.pid]
        assert proportional_memory(found) > 40_000_000
        assert pids_with_env("LOWPREC_TEST_TAG", "not-" + tag) == []
    finally:
        child.kill()
        child.wait()
        child.stdout.close()
        child.stdin.close()

"""Finding a run's processes by their environment and summing their memory (scale benchmark)."""

from __future__ import annotations

import os
import subprocess
import sys
import uuid

from scripts.processes import pids_with_env, proportional_memory


def test_processes_are_found_by_an_inherited_variable_and_their_memory_summed() -> None:
    tag = uuid.uuid4().hex
    env = dict(os.environ, LOWPREC_TEST_TAG=tag)
    # a child that fills ~40 MB (touched pages count) and waits
    code = 'import sys; b = b"x" * 40_000_000; sys.stdin.read()'
    child = subprocess.Popen([sys.executable, "-c", code], env=env, stdin=subprocess.PIPE)
    try:
        for _ in range(100):
            found = pids_with_env("LOWPREC_TEST_TAG", tag)
            if found and proportional_memory(found) > 40_000_000:
                break
            subprocess.run(["sleep", "0.05"], check=True)
        assert found == [child.pid]
        assert proportional_memory(found) > 40_000_000
        assert pids_with_env("LOWPREC_TEST_TAG", "not-" + tag) == []
    finally:
        child.kill()
        child.wait()

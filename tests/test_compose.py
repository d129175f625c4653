"""deploy/compose.yaml as host command lines (deploy.compose): interpolation and mounts."""

from __future__ import annotations

from pathlib import Path

import pytest

from deploy.compose import ComposeError, host_command, host_environment, interpolate, load_services


def _sources(service: dict, root: Path) -> dict[str, Path]:
    return {v.split(":")[0]: root / v.split(":")[0].lstrip("./") for v in service["volumes"]}


def test_interpolation_follows_compose():
    env = {"SET": "x", "EMPTY": ""}
    assert interpolate("${SET:-d} ${UNSET:-d} ${EMPTY:-d}", env) == "x d d"
    with pytest.raises(ComposeError, match="MISSING"):
        interpolate("${MISSING}", env)


@pytest.mark.parametrize("name", list(load_services()))
def test_every_path_a_service_uses_is_mounted(name, tmp_path):
    service = load_services()[name]
    command = host_command(name, _sources(service, tmp_path), {})
    assert command[0] in ("flower-superlink", "flower-supernode")
    assert not any("/app/" in arg for arg in command), command  # all mapped onto the host
    assert all(
        "/app/" not in v for v in host_environment(name, _sources(service, tmp_path)).values()
    )


def test_supernodes_differ_only_in_their_key_and_images():
    services = load_services()
    nodes = [s for n, s in services.items() if n.startswith("supernode-")]
    assert len(nodes) == 3
    assert all(s["command"] == nodes[0]["command"] for s in nodes)
    assert "--node-config=data-dir='/app/data'" in nodes[0]["command"]
    sources = [sorted(v.split(":")[0] for v in s["volumes"]) for s in nodes]
    for i, own in enumerate(sources):
        assert own == sorted(["./credentials/ca.crt", f"./credentials/supernode-{i}.key",
                              f"./device-data/{i}"])  # fmt: skip


def test_superlink_defaults_are_the_guides(tmp_path):
    service = load_services()["superlink"]
    command = host_command("superlink", _sources(service, tmp_path), {})
    assert "--port=8000" in command and "--host=0.0.0.0" in command
    assert "--enable-supernode-auth" in command
    assert f"--database={tmp_path}/superlink-state/superlink.db" in command


def test_a_path_outside_the_mounts_or_an_unmapped_source_is_refused(tmp_path):
    services = {"s": {"entrypoint": ["x"], "command": ["--f=/app/other/file"],
                      "volumes": ["./a:/app/a:ro"]}}  # fmt: skip
    with pytest.raises(ComposeError, match="/app/other/file is in no volume"):
        host_command("s", {"./a": tmp_path}, {}, services)
    with pytest.raises(ComposeError, match="no host path given for the volume source './a'"):
        host_command("s", {}, {}, services)

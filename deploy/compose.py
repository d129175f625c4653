"""The command lines of ``deploy/compose.yaml``, as host processes: one source for both.

A service's command line is its ``entrypoint`` plus its ``command``, with ``${VAR:-default}``
interpolated as Docker Compose does. Every container path in it must lie under one of the
service's ``volumes``; :func:`host_command` replaces it with the host folder or file given for
that volume's source (``./credentials/ca.crt`` -> the test's CA file), and refuses a path no
volume covers, or a volume source it was given no host path for. So the loopback deployment
(``deploy.processes``) runs exactly what the containers would, over exactly their mounts.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from pathlib import Path, PurePosixPath

import yaml

COMPOSE_FILE = Path(__file__).with_name("compose.yaml")
_VARIABLE = re.compile(r"\$\{(\w+)(?::-([^}]*))?\}")
#: Where the official images keep everything this recipe mounts.
CONTAINER_ROOT = PurePosixPath("/app")


class ComposeError(ValueError):
    """compose.yaml and the host paths given for it do not fit together."""


def load_services(path: Path = COMPOSE_FILE) -> dict[str, dict]:
    """The ``services`` of a compose file (YAML anchors and merge keys resolved)."""
    return yaml.safe_load(path.read_text())["services"]


def interpolate(text: str, env: Mapping[str, str]) -> str:
    """``${VAR}`` and ``${VAR:-default}`` replaced from ``env``, as Docker Compose does."""

    def value(match: re.Match) -> str:
        name, default = match.group(1), match.group(2)
        if env.get(name):
            return env[name]
        if default is None:
            raise ComposeError(f"${{{name}}} has no default and is not set")
        return default

    return _VARIABLE.sub(value, text)


def mounts(service: Mapping, sources: Mapping[str, os.PathLike | str]) -> dict[str, Path]:
    """Container path -> host path for every volume of ``service``.

    ``sources`` gives the host path of each volume source (``./credentials/ca.crt``).
    """
    table = {}
    for volume in service.get("volumes", []):
        source, target = volume.split(":")[:2]
        if source not in sources:
            raise ComposeError(f"no host path given for the volume source {source!r}")
        table[target] = Path(sources[source])
    return table


def host_command(
    service_name: str,
    sources: Mapping[str, os.PathLike | str],
    env: Mapping[str, str],
    services: Mapping[str, Mapping] | None = None,
) -> list[str]:
    """The service's command line with its container paths mapped onto host paths."""
    service = (services or load_services())[service_name]
    table = mounts(service, sources)
    args = [interpolate(str(a), env) for a in [*service["entrypoint"], *service["command"]]]
    return [_map_paths(a, table, service_name) for a in args]


def host_environment(
    service_name: str,
    sources: Mapping[str, os.PathLike | str],
    services: Mapping[str, Mapping] | None = None,
) -> dict[str, str]:
    """The service's ``environment``, container paths mapped onto host paths."""
    service = (services or load_services())[service_name]
    table = mounts(service, sources)
    env = service.get("environment", {})
    return {k: _map_paths(str(v), table, service_name) for k, v in env.items()}


def _map_paths(arg: str, table: Mapping[str, Path], service_name: str) -> str:
    """``arg`` with each container path (under /app) replaced by its mount's host path."""

    def replace(match: re.Match) -> str:
        path = match.group(0)
        for target, host in sorted(table.items(), key=lambda kv: -len(kv[0])):
            if path == target or path.startswith(target.rstrip("/") + "/"):
                return str(host) + path[len(target) :]
        raise ComposeError(f"{service_name}: {path} is in no volume of the service")

    return re.sub(rf"{CONTAINER_ROOT}/[\w./-]*", replace, arg)

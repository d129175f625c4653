"""Run ``flwr run .`` on a private local SuperLink and always stop it afterwards.

``flwr run .`` starts a detached local SuperLink that outlives the command and keeps the
environment of the run that started it. This wrapper gives it a private ``FLWR_HOME``, the
offline-safe environment, waits for the run (``--stream``) and kills the SuperLink at the end,
even on failure or Ctrl-C. Usage:

    python -m scripts.flwr_local --num-supernodes 10 --run-config "federation.num_rounds=5"
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

from scripts.processes import cmdline_pids, terminate

PROJECT_DIR = Path(__file__).resolve().parent.parent
LOCAL_SUPERLINK_PORTS = (39091, 39093)
#: One CPU per simulated client (each trains with one torch thread): Flower's default of 2
#: runs a single client at a time on a 2-core machine. Results do not depend on it.
DEFAULT_FEDERATION_CONFIG = "client-resources-num-cpus=1"
COMPLETED = "finished:completed"
OFFLINE_ENV = {
    "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
    "FLWR_TELEMETRY_ENABLED": "0",
    "FLWR_DISABLE_UPDATE_CHECK": "1",
    "RAY_USAGE_STATS_ENABLED": "0",
}


def flwr_env(flwr_home: Path) -> dict[str, str]:
    """The environment for ``flwr``: private FLWR_HOME, no runtime pip installs, no telemetry."""
    env = dict(os.environ, **OFFLINE_ENV, FLWR_HOME=str(flwr_home))
    bin_dir = str(Path(sys.executable).parent)  # the venv's flwr, flower-superlink, ...
    env["PATH"] = bin_dir + os.pathsep + env.get("PATH", "")
    return env


def link_installed_apps(flwr_home: Path, apps_dir: Path) -> None:
    """Make ``flwr_home/apps`` (where Flower installs the apps it runs) a link to
    ``apps_dir``, unless the home already has an ``apps/``: an app installed there counts as
    installed in this home, with what it keeps beside its sources (numba's compiled kernels).
    """
    apps = flwr_home / "apps"
    if not apps.exists():
        apps.symlink_to(Path(apps_dir).resolve(), target_is_directory=True)


def superlink_pids(flwr_home: Path) -> list[int]:
    """PIDs of SuperLink/SuperExec processes that belong to ``flwr_home`` (by command line)."""
    return [pid for pid, _ in cmdline_pids("flower-super", str(flwr_home.resolve()))]


def stop_local_superlink(flwr_home: Path, grace: float = 5.0) -> int:
    """Terminate the SuperLink of ``flwr_home`` and everything it spawned; returns how many."""
    pids = superlink_pids(flwr_home)
    terminate(pids, grace)
    return len(pids)


def _port_in_use(port: int) -> bool:
    with socket.socket() as sock:
        return sock.connect_ex(("127.0.0.1", port)) == 0


def _write_connection_config(flwr_home: Path) -> None:
    flwr_home.mkdir(parents=True, exist_ok=True)
    config = flwr_home / "config.toml"
    if not config.exists():
        config.write_text(
            '[superlink]\ndefault = "local"\n\n[superlink.local]\naddress = ":local:"\n'
        )


def last_run_status(flwr_home: Path) -> tuple[str, str]:
    """(status, details) of the newest run the local SuperLink of ``flwr_home`` knows."""
    listed = subprocess.run(
        ["flwr", "list", "--format", "json"],
        env=flwr_env(flwr_home),
        cwd=PROJECT_DIR,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    try:
        runs = json.loads(listed.stdout)["runs"]
        newest = max(runs, key=lambda run: run["pending-at"])
    except (ValueError, KeyError, TypeError) as err:
        return "unknown", f"`flwr list` gave no run status ({err}): {listed.stderr[-500:]}"
    return newest["status"], newest.get("status-details", "")


def start_simulation(
    run_config: str = "",
    num_supernodes: int = 10,
    flwr_home: Path | None = None,
    log_path: Path | None = None,
    extra_federation_config: str = DEFAULT_FEDERATION_CONFIG,
    app_dir: Path | None = None,
) -> subprocess.Popen:
    """Start ``flwr run . --stream`` on a fresh private local SuperLink; returns the process.

    Its output goes to ``log_path`` (else this process's stdout). Stop it with
    ``stop_local_superlink`` (or ``kill_local_superlink``, the ``kill -9`` of a crash).
    ``app_dir`` runs another Flower app than this project (e.g. ``examples/mnist_lowprec``).
    """
    flwr_home = (flwr_home or PROJECT_DIR / ".flwr_home").resolve()
    _write_connection_config(flwr_home)
    stop_local_superlink(flwr_home)  # a stale one would keep an old environment
    busy = [p for p in LOCAL_SUPERLINK_PORTS if _port_in_use(p)]
    if busy:
        raise RuntimeError(
            f"ports {busy} are taken, probably by a local SuperLink another FLWR_HOME started "
            "(flwr run . leaves it running): stop it, e.g. pkill -f flower-superlink"
        )
    federation = f"num-supernodes={num_supernodes} {extra_federation_config}".strip()
    app = Path(app_dir).resolve() if app_dir else PROJECT_DIR
    command = ["flwr", "run", str(app), "--stream", "--federation-config", federation]
    if run_config:
        command += ["--run-config", run_config]
    out = log_path.open("w") if log_path else None
    try:
        return subprocess.Popen(
            command,
            env=flwr_env(flwr_home),
            cwd=PROJECT_DIR,
            stdout=out,
            stderr=subprocess.STDOUT if out else None,
        )
    finally:
        if out:
            out.close()  # the child keeps its own descriptor


def kill_local_superlink(flwr_home: Path) -> None:
    """``kill -9`` the SuperLink of ``flwr_home`` and everything it spawned (a crash)."""
    terminate(superlink_pids(flwr_home.resolve()), grace=5.0, signals=(signal.SIGKILL,))


def run_simulation(
    run_config: str = "",
    num_supernodes: int = 10,
    flwr_home: Path | None = None,
    timeout: float | None = None,
    log_path: Path | None = None,
    extra_federation_config: str = DEFAULT_FEDERATION_CONFIG,
    app_dir: Path | None = None,
) -> int:
    """``flwr run . --stream`` with ``num_supernodes`` simulated clients; returns an exit code.

    0 only when the run finished as ``finished:completed``: ``flwr run`` itself exits 0 even
    when the ServerApp raised, so a run that failed returns 1 and says why. ``app_dir``: as
    for ``start_simulation``.
    """
    flwr_home = (flwr_home or PROJECT_DIR / ".flwr_home").resolve()
    process = start_simulation(
        run_config, num_supernodes, flwr_home, log_path, extra_federation_config, app_dir
    )
    try:
        code = process.wait(timeout=timeout)
        if code != 0:
            return code
        # `flwr run --stream` exits 0 even when the run failed: ask the SuperLink how it ended.
        status, details = last_run_status(flwr_home)
        if status != COMPLETED:
            message = f"the run ended with status {status}: {details}"
            if log_path:
                with log_path.open("a") as log:
                    print(message, file=log)
            print(message, file=sys.stderr, flush=True)
            return 1
        return 0
    finally:
        if process.poll() is None:
            process.kill()
        stop_local_superlink(flwr_home)


def build_parser() -> argparse.ArgumentParser:
    """The command line of ``python -m scripts.flwr_local``."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--num-supernodes", type=int, default=10)
    parser.add_argument("--run-config", default="", help="as for flwr run --run-config")
    parser.add_argument("--flwr-home", type=Path, default=None)
    parser.add_argument(
        "--federation-config",
        default=DEFAULT_FEDERATION_CONFIG,
        help="more of flwr run's --federation-config (Flower backend options)",
    )
    return parser


def main() -> None:
    """Command-line entry point."""
    args = build_parser().parse_args()
    sys.exit(
        run_simulation(
            args.run_config,
            args.num_supernodes,
            args.flwr_home,
            extra_federation_config=args.federation_config,
        )
    )


if __name__ == "__main__":
    main()

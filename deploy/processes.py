"""Start a Flower deployment (SuperLink, SuperNodes, ``flwr`` CLI) as local processes.

Used by ``tests/test_deployment.py`` and by ``python -m deploy.processes`` (a loopback
rehearsal of the steps in ``deploy/README.md``). Every process gets a log file and an
environment tag (``LOWPREC_DEPLOY_TAG``) that its children inherit: Flower launches SuperExec,
ServerApp and ClientApp processes detached (new sessions, re-parented when their parent dies),
so :meth:`LoopbackDeployment.stop` finds them by the tag as well as by the process tree and
terminates all of them, even after a failure.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import json
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from deploy.compose import host_command, host_environment, load_services
from lowprec_fl.federated_data import resolve_data_root
from lowprec_fl.protocol import NUM_PARTITIONS_KEY, PARTITION_KEY
from scripts.flwr_local import PROJECT_DIR, flwr_env, link_installed_apps
from scripts.processes import terminate

TAG_VARIABLE = "LOWPREC_DEPLOY_TAG"
#: Flower exit code a SuperNode logs ("Exit Code: 305") when the SuperLink refuses to activate
#: it, e.g. because its public key was never registered (ref-exit-codes/305). The process
#: itself exits with status 1, as for every Flower error code.
SUPERNODE_CONNECTION_FAILED = 305


# ----------------------------------------------------------------------------- processes
def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def _die_with_parent() -> None:
    """In the child, before exec: SIGTERM it when its parent dies, even by SIGKILL (Linux).

    The SuperLink and SuperNodes never exit on their own; this way a test runner killed hard
    does not leave them behind (Flower's own SuperExec/App processes watch their parent).
    """
    if sys.platform.startswith("linux"):
        with contextlib.suppress(Exception):
            ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def tagged_pids(tag: str) -> list[int]:
    """PIDs of live processes whose environment carries ``LOWPREC_DEPLOY_TAG=tag``."""
    marker = f"{TAG_VARIABLE}={tag}".encode()
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            environ = (entry / "environ").read_bytes()
            state = (entry / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if state != "Z" and marker in environ.split(b"\0"):
            pids.append(int(entry.name))
    return pids


@dataclass
class ManagedProcess:
    """A started process, its command and its log file."""

    name: str
    command: list[str]
    log_path: Path
    popen: subprocess.Popen
    may_exit: bool = False  # e.g. a SuperNode that is expected to be refused

    @property
    def pid(self) -> int:
        """The process id."""
        return self.popen.pid

    def log(self) -> str:
        """Everything the process wrote so far."""
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def wait(self, timeout: float) -> int | None:
        """Exit code, or None when still running after ``timeout`` seconds."""
        try:
            return self.popen.wait(timeout)
        except subprocess.TimeoutExpired:
            return None


# ----------------------------------------------------------------------------- deployment
@dataclass
class Credentials:
    """Paths written by ``deploy.make_credentials``."""

    directory: Path

    @property
    def ca(self) -> Path:
        """The CA certificate (``--root-certificates``, ``--ssl-ca-certfile``)."""
        return self.directory / "ca.crt"

    @property
    def server_cert(self) -> Path:
        """The SuperLink certificate (``--ssl-certfile``)."""
        return self.directory / "server.pem"

    @property
    def server_key(self) -> Path:
        """The SuperLink TLS key (``--ssl-keyfile``)."""
        return self.directory / "server.key"

    def supernode_key(self, i: int) -> Path:
        """SuperNode ``i``'s private key (``--auth-supernode-private-key``)."""
        return self.directory / f"supernode-{i}.key"

    def supernode_public_key(self, i: int) -> Path:
        """SuperNode ``i``'s public key (``flwr supernode register``)."""
        return self.directory / f"supernode-{i}.pub"


@dataclass
class LoopbackDeployment:
    """One SuperLink (TLS + SuperNode authentication) and SuperNodes, all on one host.

    Each daemon gets its own ``FLWR_HOME`` and working directory under ``workdir``, as it
    would on its own machine; the ``flwr`` CLI uses ``workdir/flwr_home`` with a connection
    named ``connection``. Use as a context manager, or call :meth:`stop` in a ``finally``.

    ``apps_dir``: one folder standing for every daemon's ``FLWR_HOME/apps``, as if the app
    were already installed on each machine (``flwr install``). Install the app there before
    the daemons start: Flower takes an existing install folder as complete, so daemons that
    install into it together could run a half-copied app.
    """

    workdir: Path
    credentials: Credentials
    host: str = "127.0.0.1"
    connection: str = "deployment"
    extra_env: dict[str, str] = field(default_factory=dict)
    tag: str = field(default_factory=lambda: uuid.uuid4().hex)
    superlink: ManagedProcess | None = None
    supernodes: list[ManagedProcess] = field(default_factory=list)
    superlink_port: int | None = None
    apps_dir: Path | None = None

    def __post_init__(self) -> None:
        self.workdir = Path(self.workdir).resolve()
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.cli_home = self.workdir / "flwr_home"

    def __enter__(self) -> LoopbackDeployment:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # ------------------------------------------------------------------ environment
    def env(self, home: Path) -> dict[str, str]:
        """``flwr_env`` (offline, no telemetry, venv on PATH) plus this deployment's tag."""
        env = flwr_env(home)
        env.update(self.extra_env)
        env[TAG_VARIABLE] = self.tag
        return env

    def _start(
        self,
        name: str,
        command: list[str],
        home: Path,
        may_exit: bool = False,
        env: dict[str, str] | None = None,
    ) -> ManagedProcess:
        cwd = self.workdir / name
        cwd.mkdir(parents=True, exist_ok=True)
        home.mkdir(parents=True, exist_ok=True)
        if self.apps_dir is not None:
            link_installed_apps(home, self.apps_dir)
        log_path = self.workdir / f"{name}.log"
        with log_path.open("wb") as log:
            popen = subprocess.Popen(
                command,
                cwd=cwd,
                env=self.env(home) | (env or {}),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                preexec_fn=_die_with_parent,
            )
        return ManagedProcess(name, command, log_path, popen, may_exit)

    # ------------------------------------------------------------------ SuperLink
    @property
    def address(self) -> str:
        """``host:port`` of the SuperLink (Fleet, Control and Runtime APIs share it)."""
        if self.superlink_port is None:
            raise RuntimeError("start the SuperLink first")
        return f"{self.host}:{self.superlink_port}"

    def start_superlink(
        self, port: int | None = None, data_root: Path | None = None, timeout: float = 60
    ) -> ManagedProcess:
        """compose.yaml's ``superlink``: TLS, ``--enable-supernode-auth``, its state database.

        Its mounts map onto ``workdir`` (``superlink-state/``, ``outputs/``), the credentials,
        and ``data_root`` (the ServerApp's test set; default: this process's ``DATA_ROOT``).
        Waits until it serves.
        """
        self.superlink_port = port or free_port(self.host)
        c = self.credentials
        data = data_root or Path(resolve_data_root(self.extra_env.get("DATA_ROOT")))
        sources = {
            "./credentials/ca.crt": c.ca,
            "./credentials/server.pem": c.server_cert,
            "./credentials/server.key": c.server_key,
            "./server-data": data,
            "./superlink-state": self.workdir / "superlink-state",
            "./outputs": self.workdir / "outputs",
        }
        for folder in ("superlink-state", "outputs"):
            (self.workdir / folder).mkdir(exist_ok=True)
        env = {"SUPERLINK_PORT": str(self.superlink_port), "SUPERLINK_BIND": self.host}
        command = host_command("superlink", sources, env)
        self.superlink = self._start(
            "superlink",
            command,
            self.workdir / "superlink_home",
            env=host_environment("superlink", sources),
        )
        self.write_connection_config()
        self._wait_for(
            lambda: "Application startup complete" in self.superlink.log(),
            self.superlink,
            timeout,
            "the SuperLink to start",
        )
        return self.superlink

    def write_connection_config(self) -> Path:
        """``$FLWR_HOME/config.toml`` for the CLI: the SuperLink address and the CA."""
        self.cli_home.mkdir(parents=True, exist_ok=True)
        path = self.cli_home / "config.toml"
        path.write_text(
            f'[superlink]\ndefault = "{self.connection}"\n\n'
            f"[superlink.{self.connection}]\n"
            f'address = "{self.address}"\n'
            f'root-certificates = "{self.credentials.ca}"\n'
        )
        return path

    # ------------------------------------------------------------------ CLI
    def flwr(
        self, *args: str, timeout: float = 120, cwd: Path | None = None
    ) -> subprocess.CompletedProcess:
        """Run ``flwr ARGS`` with the CLI's FLWR_HOME; output captured as text."""
        return subprocess.run(
            ["flwr", *args],
            cwd=cwd or self.workdir,
            env=self.env(self.cli_home),
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )

    def flwr_json(self, *args: str, timeout: float = 120) -> dict:
        """``flwr ARGS --format json``, parsed; raises with the output when it fails."""
        done = self.flwr(*args, "--format", "json", timeout=timeout)
        try:
            data = json.loads(done.stdout)
        except json.JSONDecodeError:
            data = None
        if done.returncode != 0 or not isinstance(data, dict) or not data.get("success"):
            raise RuntimeError(
                f"flwr {' '.join(args)} failed ({done.returncode}):\n{done.stdout}\n{done.stderr}"
            )
        return data

    def register(self, public_key: Path) -> int:
        """``flwr supernode register KEY.pub``; returns the node id the SuperLink assigned."""
        data = self.flwr_json("supernode", "register", str(public_key), self.connection)
        return int(data["node-id"])

    def nodes(self) -> list[dict]:
        """``flwr supernode list`` as JSON rows (node-id, status, ...)."""
        return self.flwr_json("supernode", "list", self.connection)["nodes"]

    def runs(self) -> list[dict]:
        """``flwr list`` as JSON rows (run-id, status, network-traffic, ...)."""
        return self.flwr_json("list", self.connection)["runs"]

    def run_app(
        self, run_config: str, app_dir: Path = PROJECT_DIR, timeout: float = 600
    ) -> subprocess.CompletedProcess:
        """``flwr run APP CONNECTION --stream --run-config RUN_CONFIG``; waits for the end."""
        command = ["run", str(app_dir), self.connection, "--stream"]
        if run_config:
            command += ["--run-config", run_config]
        return self.flwr(*command, timeout=timeout, cwd=app_dir)

    # ------------------------------------------------------------------ SuperNodes
    def start_supernode(
        self,
        index: int,
        key: Path,
        data_dir: Path | None = None,
        node_config: str | None = None,
        name: str | None = None,
        may_exit: bool = False,
    ) -> ManagedProcess:
        """compose.yaml's ``supernode-<index>`` with ``key`` and ``data_dir`` mounted (no wait).

        ``node_config`` replaces its ``--node-config`` (e.g. ``partition_node_config``: a share
        of the dataset under ``DATA_ROOT`` instead of a folder of its own). Each SuperNode also
        gets a free ``--port``: on one host they cannot all take the default 9094, as they do
        in their own containers. ``may_exit`` marks a SuperNode expected to stop (e.g.
        refused): :meth:`wait_online` then doesn't treat its exit as a failure.
        """
        services = load_services()
        service = f"supernode-{index}" if f"supernode-{index}" in services else "supernode-0"
        own = service.removeprefix("supernode-")
        sources = {
            "./credentials/ca.crt": self.credentials.ca,
            f"./credentials/supernode-{own}.key": key,
            f"./device-data/{own}": data_dir or self.workdir / "no-device-data",
        }
        env = {"SUPERLINK_HOST": self.host, "SUPERLINK_PORT": str(self.superlink_port)}
        command = host_command(service, sources, env, services)
        if node_config is not None:
            command = [a for a in command if not a.startswith("--node-config=")]
            command.append(f"--node-config={node_config}")
        command += ["--port", str(free_port(self.host))]
        name = name or f"supernode-{index}"
        process = self._start(name, command, self.workdir / f"{name}_home", may_exit)
        self.supernodes.append(process)
        return process

    def wait_online(self, node_ids: Iterable[int], timeout: float = 90) -> list[dict]:
        """Wait until ``flwr supernode list`` shows every id in ``node_ids`` online."""
        wanted = set(node_ids)
        deadline = time.monotonic() + timeout
        while True:
            rows = self.nodes()
            online = {int(r["node-id"]) for r in rows if r["status"] == "online"}
            if wanted <= online:
                return rows
            for process in self.supernodes:
                code = process.popen.poll()
                if code is not None and not process.may_exit:
                    raise RuntimeError(
                        f"{process.name} exited with {code}:\n{process.log()[-3000:]}"
                    )
            if time.monotonic() > deadline:
                raise TimeoutError(f"nodes {sorted(wanted - online)} not online: {rows}")
            time.sleep(0.5)

    # ------------------------------------------------------------------ teardown
    def processes(self) -> list[ManagedProcess]:
        """Every daemon started so far."""
        return ([self.superlink] if self.superlink else []) + list(self.supernodes)

    def leftover_pids(self) -> list[int]:
        """Live processes that belong to this deployment (by environment tag)."""
        return tagged_pids(self.tag)

    def stop(self, grace: float = 5.0) -> None:
        """Stop SuperNodes first (so they deactivate), then the SuperLink, then stragglers."""
        terminate([p.pid for p in self.supernodes if p.popen.poll() is None], grace)
        if self.superlink is not None and self.superlink.popen.poll() is None:
            terminate([self.superlink.pid], grace)
        for _ in range(3):  # detached SuperExec / ServerApp / ClientApp processes
            leftovers = self.leftover_pids()
            if not leftovers:
                break
            terminate(leftovers, grace)
        for process in self.processes():
            with contextlib.suppress(subprocess.TimeoutExpired):
                process.popen.wait(grace)

    def _wait_for(self, ready, process: ManagedProcess, timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while not ready():
            if process.popen.poll() is not None:
                raise RuntimeError(
                    f"{process.name} exited with {process.popen.returncode} while waiting for "
                    f"{what}:\n{process.log()[-3000:]}"
                )
            if time.monotonic() > deadline:
                raise TimeoutError(f"timed out waiting for {what}:\n{process.log()[-3000:]}")
            time.sleep(0.2)


# ----------------------------------------------------------------------------- rehearsal
def partition_node_config(partition_id: int, num_partitions: int) -> str:
    """``--node-config`` of a SuperNode that trains on a share of the dataset."""
    return f"{PARTITION_KEY}={partition_id} {NUM_PARTITIONS_KEY}={num_partitions}"


def rehearse(
    workdir: Path,
    num_supernodes: int,
    run_config: str,
    keep_running: bool = False,
    port: int | None = None,
    data_dirs: Sequence[Path] = (),
) -> int:
    """Credentials, SuperLink, registration, SuperNodes and one ``flwr run``, on loopback.

    With ``data_dirs``, one SuperNode per folder trains on its images; otherwise
    ``num_supernodes`` SuperNodes share the dataset under ``DATA_ROOT``. Returns 0 when the
    run finished with status ``finished:completed`` (``flwr run --stream`` itself exits 0 even
    when the ServerApp failed), 1 otherwise. Every process's log stays in ``workdir``.
    """
    from deploy.make_credentials import make_credentials

    count = len(data_dirs) or num_supernodes
    credentials = Credentials(workdir / "credentials")
    make_credentials(credentials.directory, count, force=True)
    deployment = LoopbackDeployment(workdir, credentials)
    completed = False
    try:
        deployment.start_superlink(port=port)
        print(f"SuperLink on {deployment.address}; logs in {workdir}", flush=True)
        ids = [deployment.register(credentials.supernode_public_key(i)) for i in range(count)]
        for i in range(count):
            key = credentials.supernode_key(i)
            if data_dirs:
                deployment.start_supernode(i, key, data_dir=Path(data_dirs[i]).resolve())
            else:
                deployment.start_supernode(i, key, node_config=partition_node_config(i, count))
        deployment.wait_online(ids)
        print(f"SuperNodes online: {ids}", flush=True)
        done = deployment.run_app(run_config)
        print(done.stdout, done.stderr, sep="\n", flush=True)
        runs = deployment.runs()
        for run in runs:
            print(json.dumps(run, indent=2), flush=True)
        completed = done.returncode == 0 and [r["status"] for r in runs] == ["finished:completed"]
        if keep_running:
            print(f"Still running; FLWR_HOME={deployment.cli_home}. Ctrl-C stops everything.")
            with contextlib.suppress(KeyboardInterrupt):
                while True:
                    time.sleep(3600)
        return 0 if completed else 1
    finally:
        deployment.stop()
        print("Logs:", *(f"  {p.name}: {p.log_path}" for p in deployment.processes()), sep="\n")
        if not completed and deployment.superlink is not None:
            print(f"--- {deployment.superlink.log_path} ---\n{deployment.superlink.log()}")


def main(argv: Sequence[str] | None = None) -> None:
    """Command-line entry point: a loopback rehearsal of a secure deployment."""
    sys.exit(rehearse(**vars(build_parser().parse_args(argv))))


def build_parser() -> argparse.ArgumentParser:
    """The command line of ``python -m deploy.processes``."""
    parser = argparse.ArgumentParser(
        prog="python -m deploy.processes",
        description="Rehearse a TLS + SuperNode-authentication deployment on loopback: "
        "credentials, SuperLink, key registration, SuperNodes, flwr run, flwr list. "
        "Without --run-config the app runs its full default configuration.",
    )
    parser.add_argument("workdir", type=Path, help="folder for credentials, logs and state")
    parser.add_argument("--supernodes", dest="num_supernodes", type=int, default=2)
    parser.add_argument("--run-config", default="", help="as for flwr run --run-config")
    parser.add_argument("--port", type=int, default=None, help="SuperLink port (default: free)")
    parser.add_argument(
        "--data-dir",
        dest="data_dirs",
        type=Path,
        action="append",
        default=[],
        help="a SuperNode's own image folder (repeat: one SuperNode each; replaces --supernodes)",
    )
    parser.add_argument("--keep-running", action="store_true")
    return parser


if __name__ == "__main__":
    main()

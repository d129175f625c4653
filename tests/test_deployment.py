"""End to end: a real deployment on loopback - TLS, SuperNode authentication, ``flwr run``.

The daemons run the command lines of ``deploy/compose.yaml`` (the container recipe), with its
mounts mapped onto the test's folders: one SuperLink (TLS with a CA made by
``deploy.make_credentials``, ``--enable-supernode-auth``) on a free port, three SuperNodes
whose public keys were registered with ``flwr supernode register``, and one SuperNode with a
key that was never registered. Each SuperNode holds its own images, as a device would: real
MNIST digits of different classes written to its own folder (``--node-config data-dir=...``).
The app trains 2 rounds of 8-bit FedAvg through ``flwr run . <connection> --stream`` with the
same run-config keys as in simulation. ``deploy.preflight`` checks the CLI's connection
against the real SuperLink. Every process is stopped in a finalizer, even when a test fails,
and the last test checks that none is left.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator

import pytest

from deploy.make_credentials import make_credentials
from deploy.preflight import main as preflight
from deploy.processes import (
    SUPERNODE_CONNECTION_FAILED,
    Credentials,
    LoopbackDeployment,
    ManagedProcess,
)
from lowprec_fl.federated_data import load_image_data
from scripts.processes import cmdline_pids
from tests.shared_helpers import mnist_root, preinstalled_apps, write_image_folder

pytestmark = pytest.mark.e2e

NUM_SUPERNODES = 3
ROGUE = NUM_SUPERNODES  # index of the key pair that is never registered
#: The classes each SuperNode holds (overlapping, every digit somewhere), and how many of each.
NODE_CLASSES = ((0, 1, 2, 3), (3, 4, 5, 6), (6, 7, 8, 9))
IMAGES_PER_CLASS = 100
OVERRIDES = (
    f"federation.num_clients={NUM_SUPERNODES} federation.fraction_train=1.0 "
    f"federation.fraction_evaluate=1.0 train.local_epochs=2 train.max_steps=20 "
    "server.max_eval_samples=1000"
)
RUN_CONFIG = f"federation.num_rounds=2 overrides='{OVERRIDES}'"


class Setup:
    """The running deployment, the registered node ids and the refused SuperNode."""

    def __init__(self, deployment: LoopbackDeployment, node_ids: list[int], rogue) -> None:
        self.deployment = deployment
        self.node_ids = node_ids
        self.rogue: ManagedProcess = rogue


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Setup]:
    workdir = tmp_path_factory.mktemp("deployment")
    credentials = Credentials(workdir / "credentials")
    make_credentials(credentials.directory, NUM_SUPERNODES + 1, hosts=["127.0.0.1"])
    mnist = load_image_data("mnist", mnist_root(), train=True)
    folders = [
        write_image_folder(mnist, classes, IMAGES_PER_CLASS, workdir / f"device-{i}-images")
        for i, classes in enumerate(NODE_CLASSES)
    ]
    # DATA_ROOT: the ServerApp's central test set; the SuperNodes read only their folders.
    deployment = LoopbackDeployment(
        workdir,
        credentials,
        extra_env={"DATA_ROOT": mnist_root()},
        apps_dir=preinstalled_apps(workdir.parent),  # the app installed before it is run
    )
    try:
        deployment.start_superlink()
        node_ids = [
            deployment.register(credentials.supernode_public_key(i)) for i in range(NUM_SUPERNODES)
        ]
        for i, folder in enumerate(folders):  # deploy/compose.yaml's supernode-<i>
            deployment.start_supernode(i, credentials.supernode_key(i), data_dir=folder)
        rogue = deployment.start_supernode(
            0,
            credentials.supernode_key(ROGUE),
            data_dir=folders[0],
            name="unregistered-supernode",
            may_exit=True,
        )
        deployment.wait_online(node_ids)
        yield Setup(deployment, node_ids, rogue)
    finally:
        deployment.stop()  # also runs when start-up or a test failed


def test_supernode_with_an_unregistered_key_is_refused(setup: Setup) -> None:
    code = setup.rogue.wait(timeout=60)
    log = setup.rogue.log()
    # Flower 1.42: the SuperLink answers ActivateNode with HTTP 412 (ApiError 2004), the
    # SuperNode logs Flower exit code 305 "Failed to activate SuperNode" and the process exits
    # with status 1 at once - no retries.
    assert code == 1, log[-3000:]
    assert f"Exit Code: {SUPERNODE_CONNECTION_FAILED}" in log, log[-3000:]
    assert "Failed to activate SuperNode" in log, log[-3000:]
    superlink_log = setup.deployment.superlink.log()
    assert "No SuperNode found with the given public key" in superlink_log
    rows = setup.deployment.nodes()
    assert sorted(int(r["node-id"]) for r in rows) == sorted(setup.node_ids), rows
    assert all(r["status"] == "online" for r in rows), rows


def test_flwr_run_trains_over_tls_with_authenticated_supernodes(setup: Setup) -> None:
    deployment = setup.deployment
    out = deployment.workdir / "out"
    done = deployment.run_app(f"{RUN_CONFIG} output-dir='{out}'", timeout=300)
    text = done.stdout + done.stderr
    assert done.returncode == 0, text[-4000:]
    # `flwr run --stream` exits 0 even when the ServerApp fails: the run's status tells.
    runs = deployment.runs()
    assert len(runs) == 1, runs
    run = runs[0]
    assert run["status"] == "finished:completed", (run, text[-4000:])
    assert "round   2/2" in text

    results = json.loads((out / "results.json").read_text())
    rows = results["rounds"]
    assert [r["round"] for r in rows] == [0, 1, 2]
    assert results["config"]["quantization"]["weight_bits"] == 8
    assert results["config"]["federation"]["num_clients"] == NUM_SUPERNODES
    # Two short rounds on four classes per device: it learns, not much (0.07 -> 0.19 measured).
    assert rows[-1]["accuracy"] > rows[0]["accuracy"] + 0.05, rows
    for row in rows[1:]:
        assert row["rejected_updates"] == 0, row
        # the global model on each device's own held-out images: 0.35 measured, chance 0.1
        assert row["eval_accuracy"] > 0.2, row
        assert 0 < row["uplink_bytes"] < 0.35 * row["fp32_uplink_bytes"], row
        assert 0 < row["downlink_bytes"] < 0.35 * row["fp32_downlink_bytes"], row
    assert (out / "model.safetensors").stat().st_size > 0

    # The SuperLink counts the Fleet API's protobuf messages and object payloads (no TLS/HTTP
    # framing); the strategy counts each message's serialized RecordDict. Same order expected.
    traffic = run["network-traffic"]
    accounted_up = sum(r["uplink_bytes"] for r in rows)
    accounted_down = sum(r["downlink_bytes"] for r in rows)
    inbound, outbound = traffic["inbound-bytes"], traffic["outbound-bytes"]
    print(
        f"\nflwr list network traffic: inbound {inbound} B, outbound {outbound} B; "
        f"results.json: uplink {accounted_up} B, downlink {accounted_down} B; "
        f"ratios {inbound / accounted_up:.3f} (in/up), {outbound / accounted_down:.3f} (out/down)"
    )
    assert 0.9 * accounted_up <= inbound <= 1.6 * accounted_up, (traffic, accounted_up)
    assert 0.9 * accounted_down <= outbound <= 1.6 * accounted_down, (traffic, accounted_down)
    pushed = re.findall(r"Push replies from node_id=(\d+)", deployment.superlink.log())
    assert sorted({int(n) for n in pushed}) == sorted(setup.node_ids)  # every node trained
    for i, classes in enumerate(NODE_CLASSES):  # ... each on its own images, all of them
        held = {c: IMAGES_PER_CLASS for c in classes}
        log = deployment.supernodes[i].log()
        assert f"Local data: {len(held) * IMAGES_PER_CLASS} MNIST images" in log, log[-3000:]
        assert f"per class {held}" in log, log[-3000:]


def test_preflight_passes_the_cli_connection_and_names_each_mistake(
    setup: Setup, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture, tmp_path
) -> None:
    deployment = setup.deployment
    monkeypatch.setenv("FLWR_HOME", str(deployment.cli_home))
    key = str(deployment.credentials.supernode_key(0))
    assert preflight([deployment.connection, "--auth-supernode-private-key", key]) == 0
    assert "ok: ready to connect" in capsys.readouterr().out
    make_credentials(tmp_path, 0)  # another CA
    for args, problem in [
        (["--root-certificates", str(tmp_path / "ca.crt")], "not signed by the CA"),
        (["--insecure"], "uses TLS, but the command line says insecure = true"),
        (["--root-certificates", str(tmp_path / "none.crt")], "does not exist"),
    ]:
        assert preflight(["--superlink", deployment.address, *args]) == 1, args
        assert problem in capsys.readouterr().out, args


def test_stopping_leaves_no_flower_process(setup: Setup) -> None:
    deployment = setup.deployment
    deployment.stop()
    assert all(p.popen.poll() is not None for p in deployment.processes())
    assert deployment.leftover_pids() == []
    stray = [
        (pid, cmdline)
        for pid, cmdline in cmdline_pids(str(deployment.workdir))
        if "flower-" in cmdline or "flwr" in cmdline
    ]
    assert stray == []

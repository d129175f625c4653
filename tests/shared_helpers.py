"""Helpers several test files use: the real-MNIST data root, devices' image folders, and
editing Flower records."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
from PIL import Image

from lowprec_fl.federated_data.loading import load_image_data, resolve_data_root


def mnist_root() -> str:
    """The real-MNIST data root: DATA_ROOT when set, else the default cache, downloading if needed.

    Tests get the data the way users do: a missing dataset is downloaded through torchvision,
    and offline that fails with the loader's error naming `dataset.root` / DATA_ROOT, so a test
    that needs MNIST never passes (or skips) silently without it.
    """
    root = resolve_data_root(None)
    for train in (True, False):
        load_image_data("mnist", root, train=train)  # cached per process after the first call
    return root


def with_item(record, key: str, value):
    """A copy of a Flower record (or RecordDict) with ``key`` set to ``value``, or removed
    (None; a missing key is fine)."""
    items = dict(record.items())
    if value is None:
        items.pop(key, None)
    else:
        items[key] = value
    return type(record)(items)


def configured_strategy(run_config: dict):
    """(strategy, model template, initial ArrayRecord) as the ServerApp builds them."""
    from flwr.app import Array, ArrayRecord

    from lowprec_fl.task.config import load_config
    from lowprec_fl.task.model import build_configured_model, float_buffer_names
    from lowprec_fl.wire import specs_of
    from strategies.factory import build_strategy

    cfg = load_config(run_config)
    model = build_configured_model(cfg)
    template = {k: v.detach().clone() for k, v in model.state_dict().items()}
    strategy = build_strategy(cfg, specs_of(template), float_buffer_names(model))
    initial = ArrayRecord({k: Array(v.numpy()) for k, v in template.items()})
    return strategy, template, initial


def preinstalled_apps(session_dir: Path) -> Path:
    """The ``apps/`` folder of a FLWR_HOME in ``session_dir`` (pytest's folder for the test
    session) where this project is installed as Flower installs the FAB it runs (``flwr
    build``, ``flwr install``), with numba's kernels already compiled beside its sources.

    Private FLWR_HOMEs link their ``apps/`` here (``private_flwr_home``, and the deployment's
    daemons): an installed app keeps its compiled kernels in ``__pycache__``, as a user's
    FLWR_HOME does from the second run on, where a fresh install in every test made each
    ServerApp and ClientApp process compile them again (35 s a process on a 2-core machine).
    Done once per session; the FAB's hash is that of its content, so every ``flwr run`` of
    the same tree finds it installed.
    """
    from scripts.flwr_local import PROJECT_DIR, flwr_env

    home = session_dir / "preinstalled-flwr-home"
    apps, complete = home / "apps", home / "complete"
    if complete.exists():
        return apps
    shutil.rmtree(home, ignore_errors=True)  # an earlier attempt that failed part way
    fab_dir = session_dir / "preinstalled-fab"
    fab_dir.mkdir(exist_ok=True)
    env = flwr_env(home)

    def run(command: list[str], cwd: Path, extra: dict[str, str] | None = None) -> None:
        done = subprocess.run(
            command, cwd=cwd, env=env | (extra or {}), capture_output=True, text=True, timeout=900
        )
        assert done.returncode == 0, (command, done.stdout[-2000:], done.stderr[-2000:])

    run(["flwr", "build", "--app", str(PROJECT_DIR)], fab_dir)
    run(["flwr", "install", str(next(fab_dir.glob("*.fab")))], fab_dir)
    (installed,) = apps.iterdir()
    # importing the apps compiles every kernel (cache=True writes them beside the sources)
    code = "import client_app.app, server_app.app"
    run([sys.executable, "-c", code], installed, {"PYTHONPATH": str(installed)})
    complete.touch()
    return apps


def private_flwr_home(tmp_path: Path, home: Path | None = None) -> Path:
    """A fresh FLWR_HOME (``home``, default ``tmp_path/flwr_home``; ``tmp_path`` a test's
    fixture) whose ``apps/`` is the session's ``preinstalled_apps``. Everything else in it
    (the SuperLink's database, the connection) is the test's own."""
    from scripts.flwr_local import link_installed_apps

    home = home or tmp_path / "flwr_home"
    home.mkdir(parents=True, exist_ok=True)
    link_installed_apps(home, preinstalled_apps(tmp_path.parent))
    return home


def real_flwr_run(
    tmp_path, run_config: str, num_supernodes: int, timeout: float, app_dir=None
) -> tuple[int, str, object]:
    """A real ``flwr run`` (of ``app_dir``, else this project) writing to ``tmp_path/out``, on
    a private FLWR_HOME: (exit code, log text, output folder)."""
    from scripts.flwr_local import run_simulation

    out, log = tmp_path / "out", tmp_path / "flwr.log"
    code = run_simulation(
        run_config=f"{run_config} output-dir='{out}'",
        num_supernodes=num_supernodes,
        # another app (an example) imports this project's kernels from the installed package,
        # whose compiled kernels persist: it gains nothing from this project pre-installed
        flwr_home=private_flwr_home(tmp_path) if app_dir is None else tmp_path / "flwr_home",
        timeout=timeout,
        log_path=log,
        app_dir=app_dir,
    )
    return code, log.read_text(), out


def write_image_folder(data, classes, per_class: int, folder):
    """Write the first ``per_class`` images of each class in ``classes`` of ``data`` as PNGs
    in ``folder/<class>/`` (a device's own data, ``ImageFolder`` layout); returns ``folder``."""
    labels = data.labels.numpy()
    for c in classes:
        (folder / str(c)).mkdir(parents=True, exist_ok=True)
        for i in np.flatnonzero(labels == c)[:per_class]:
            pixels = data.images[i].permute(1, 2, 0).squeeze(-1).numpy()
            Image.fromarray(pixels).save(folder / str(c) / f"{i:05d}.png")
    return folder

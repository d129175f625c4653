"""Helpers several test files use: the real-MNIST data root, devices' image folders, and
editing Flower records."""

from __future__ import annotations

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
        flwr_home=tmp_path / "flwr_home",
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

"""What ``pip install`` puts into a user's environment: the app's packages and nothing generic."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
#: The agreed Flower-app folders, and the package that holds everything they share.
PACKAGES = {"client_app", "server_app", "strategies", "quantization", "lowprec_fl"}


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> zipfile.ZipFile:
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
         "-w", str(out), str(ROOT)],
        check=True, capture_output=True,
    )  # fmt: skip
    (path,) = out.glob("lowprec_fl-*.whl")
    return zipfile.ZipFile(path)


def test_the_wheel_installs_only_the_apps_packages(wheel: zipfile.ZipFile) -> None:
    top = {name.split("/")[0] for name in wheel.namelist()}
    assert top - {n for n in top if n.endswith(".dist-info")} == PACKAGES


def test_the_wheel_carries_the_hydra_configs_where_the_loader_looks(wheel) -> None:
    names = set(wheel.namelist())
    configs = {p.relative_to(ROOT).as_posix() for p in (ROOT / "conf").rglob("*.yaml")}
    assert {f"lowprec_fl/{c}" for c in configs} <= names
    assert "lowprec_fl/task/config.py" in names
    assert not any(n.startswith(("tests/", "benchmarks/", "deploy/", "scripts/")) for n in names)


#: Names the checkout has as folders, which must not become importable packages.
NOT_INSTALLED = {"tests", "scripts", "deploy", "benchmarks", "experiments", "examples", "conf"}


def test_an_editable_install_exposes_the_same_packages() -> None:
    candidates = sorted(PACKAGES | NOT_INSTALLED | {"models", "task", "federated_data"})
    code = (
        "import importlib.util, sys\n"
        f"sys.path[:] = [p for p in sys.path if p not in ('', {str(ROOT)!r})]\n"
        f"print(sorted(n for n in {candidates!r} if importlib.util.find_spec(n)))"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], cwd="/", check=True, capture_output=True, text=True
    )
    assert done.stdout.strip() == str(sorted(PACKAGES))

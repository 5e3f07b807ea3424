"""``pip install 'reward-service[client]'`` brings httpx and nothing heavy.

In a fresh virtual environment holding only the project (its wheel, built here from this checkout and installed with
``--no-deps``) and the distributions ``httpx`` needs (copied from this environment's installed files), the client
imports without torch or transformers being importable at all, and scores against a running server. Everything is
offline: no package index is asked for anything.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import pytest
import tomllib
from packaging.requirements import Requirement

from tests.fixtures.commands import REPO
from tests.fixtures.servers import ServerProcess

pytestmark = [pytest.mark.slow, pytest.mark.venv]

PROJECT_FILES = ["pyproject.toml", "README.md", "service", "training"]  # what the wheel is built from

CLIENT_SCRIPT = """
import importlib.util, json, sys
from service.client import RewardClient

heavy = [m for m in ("torch", "transformers", "tokenizers", "fastapi", "numpy") if importlib.util.find_spec(m)]
with RewardClient(sys.argv[1], timeout=60) as client:
    scores = client.score(["hello world", "a good answer is helpful"]).scores
print(json.dumps({"heavy": heavy, "scores": scores, "modules": sorted(sys.modules)}))
"""


def client_distributions() -> list[metadata.Distribution]:
    """The installed distributions the ``client`` extra pulls in, transitively (markers evaluated here)."""
    extras = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    found: dict[str, metadata.Distribution] = {}
    todo = [Requirement(r) for r in extras["client"]]
    while todo:
        req = todo.pop()
        if req.marker is not None and not req.marker.evaluate({"extra": ""}):
            continue
        dist = metadata.distribution(req.name)
        if dist.metadata["Name"] in found:
            continue
        found[dist.metadata["Name"]] = dist
        todo += [Requirement(r) for r in dist.requires or []]
    return list(found.values())


def copy_installed(dist: metadata.Distribution, site_packages: Path) -> None:
    """Install an already installed distribution into another environment: its recorded files (package and
    .dist-info), less console scripts and anything else outside site-packages."""
    for file in dist.files or []:
        if file.parts[0] == ".." or "__pycache__" in file.parts:
            continue
        target = site_packages / file
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(dist.locate_file(file), target)


def run(*argv: str | Path, timeout: float = 120, cwd: Path | None = None) -> str:
    proc = subprocess.run([str(a) for a in argv], capture_output=True, text=True, timeout=timeout, cwd=cwd)
    assert proc.returncode == 0, f"{' '.join(map(str, argv))} failed ({proc.returncode}):\n{proc.stdout}{proc.stderr}"
    return proc.stdout


@pytest.fixture(scope="module")
def wheel_python(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The Python of a fresh venv holding the project's wheel (not an editable install) and httpx's distributions."""
    tmp_path = tmp_path_factory.mktemp("wheel-install")
    source = tmp_path / "src"
    source.mkdir()
    for name in PROJECT_FILES:
        path = REPO / name
        if path.is_dir():
            shutil.copytree(path, source / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(path, source / name)
    wheels = tmp_path / "wheels"
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "--no-input"]
    run(*pip, "wheel", "--quiet", "--no-deps", "--no-build-isolation", "--no-index", "-w", wheels, source)
    (wheel,) = wheels.glob("reward_service-*.whl")

    venv = tmp_path / "venv"
    run(sys.executable, "-m", "venv", "--without-pip", venv)
    python = venv / "bin" / "python"
    site_packages = Path(run(python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])").strip())
    for dist in client_distributions():
        copy_installed(dist, site_packages)
    run(*pip, "--python", python, "install", "--quiet", "--no-deps", "--no-index", wheel)
    installed = run(*pip, "--python", python, "list", "--format", "json")
    names = {d["name"].lower() for d in json.loads(installed)}
    assert "reward-service" in names and "httpx" in names, names
    assert not names & {"torch", "transformers", "tokenizers", "safetensors", "fastapi"}, names
    run(*pip, "--python", python, "check")  # every installed distribution's requirements are met
    return python


def test_the_client_extra_installs_and_scores_without_the_model_stack(
    wheel_python: Path, tiny_reward_checkpoint: Path, tmp_path: Path
):
    with ServerProcess(["--model", str(tiny_reward_checkpoint)]).start() as server:
        # run outside the checkout, so that only the installed wheel can be imported
        out = json.loads(run(wheel_python, "-c", CLIENT_SCRIPT, server.url, cwd=tmp_path))
    assert out["heavy"] == [], f"importable in a client-only environment: {out['heavy']}"
    assert not {m.split(".")[0] for m in out["modules"]} & {"torch", "transformers", "fastapi", "numpy"}
    assert len(out["scores"]) == 2 and all(isinstance(s, float) for s in out["scores"])
    assert out["scores"][0] != pytest.approx(out["scores"][1], abs=1e-4), "two different texts, two different scores"


def test_the_installed_wheel_carries_the_demo_data(wheel_python: Path, tmp_path: Path):
    """The demo pairs' topics and phrases are package data: a wheel install (no checkout to read them from)
    generates the same pairs as this checkout."""
    from training import demo_data

    script = "import json; from training import demo_data as d; print(json.dumps([d.__file__, d.generate_pairs(8)]))"
    module_file, pairs = json.loads(run(wheel_python, "-c", script, cwd=tmp_path))
    assert Path(module_file).is_relative_to(wheel_python.parents[1]), module_file  # the wheel's copy, not ours
    assert pairs == demo_data.generate_pairs(8)

"""The container images beyond their files' shape (tests/test_deploy.py): pins that are the tested versions,
checkpoints any user can serve, a build that needs BuildKit saying so at once, entry points that can run, and
``make image-test`` (build and run the images for real) where a docker daemon can be had."""

from __future__ import annotations

import ast
import os
import re
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import tomllib
from dockerfile_parse import DockerfileParser

from deploy import pins

ROOT = Path(__file__).resolve().parents[1]
DOCKERFILE = ROOT / "Dockerfile"


# -- pins ----------------------------------------------------------------------------------------------------------
def test_image_pins_are_the_versions_the_tests_run_with():
    found = {(pin.file, pin.name) for pin in pins.pins()}
    assert ("pyproject.toml", "setuptools") in found, "pyproject's build backend must be pinned (setuptools==...)"
    assert {("Dockerfile", "torch"), ("Makefile", "torch"), ("Dockerfile", "fastapi")} <= found
    stale = [f"{p.file}: {p.name}=={p.version} (installed: {p.installed})" for p in pins.drifted()]
    assert not stale, f"pins differ from this environment; run `make pins` (python -m deploy.pins --write): {stale}"


def test_a_drifted_pin_is_found_and_rewritten(tmp_path):
    for name in ("Dockerfile", "Makefile", "pyproject.toml"):
        shutil.copy(ROOT / name, tmp_path / name)
    text = (tmp_path / "Dockerfile").read_text()
    installed = pins.Pin("Dockerfile", "fastapi", "", 0, 0).installed
    (tmp_path / "Dockerfile").write_text(text.replace(f'"fastapi=={installed}"', '"fastapi==0.100.0"'))
    assert [(p.name, p.version) for p in pins.drifted(tmp_path)] == [("fastapi", "0.100.0")]
    pins.write(tmp_path)
    assert not pins.drifted(tmp_path)
    assert (tmp_path / "Dockerfile").read_text() == text


# -- checkpoints the serving image's user can read -----------------------------------------------------------------
@pytest.mark.slow  # needs the reward-train checkpoint (a training run)
def test_trained_checkpoint_is_readable_by_every_user_the_umask_allows(trained_bert_checkpoint: Path):
    umask = os.umask(0)
    os.umask(umask)
    wanted = 0o444 & ~umask
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in trained_bert_checkpoint.iterdir() if p.is_file()}
    assert "model.safetensors" in modes
    unreadable = {name: oct(mode) for name, mode in modes.items() if mode & wanted != wanted}
    assert not unreadable, f"files others cannot read (umask {umask:03o}): {unreadable}"


def without_root_privileges() -> list[str]:
    """A command prefix under which file permissions apply to this process too (root reads everything)."""
    if os.geteuid() != 0:
        return []
    setpriv = shutil.which("setpriv")
    if setpriv is None:
        pytest.skip("running as root without setpriv (util-linux): cannot drop the right to read any file")
    caps = "-dac_override,-dac_read_search"
    return [setpriv, f"--bounding-set={caps}", f"--inh-caps={caps}"]


def test_unreadable_weights_are_reported_as_permission_denied(tmp_path: Path):
    from bench.tiny import make_tiny_bert

    checkpoint = make_tiny_bert(tmp_path / "model")
    weights = checkpoint / "model.safetensors"
    weights.chmod(0o600)
    if os.geteuid() == 0:
        os.chown(weights, 4242, 4242)  # another user's, readable by that user only
    else:
        weights.chmod(0o000)
    code = "import sys; from training.checkpoint import load_checkpoint; load_checkpoint(sys.argv[1])"
    proc = subprocess.run(
        [*without_root_privileges(), sys.executable, "-c", code, str(checkpoint)],
        capture_output=True, text=True, cwd=ROOT, timeout=120, env={**os.environ, "PYTHONPATH": str(ROOT)},
    )  # fmt: skip
    assert proc.returncode != 0
    last = proc.stderr.strip().splitlines()[-1]
    assert f"{weights}: permission denied" in last and f"chmod -R a+rX {checkpoint}" in last, proc.stderr[-2000:]


# -- the Dockerfile ------------------------------------------------------------------------------------------------
def test_the_classic_builder_is_stopped_first_saying_buildkit_is_needed(tmp_path: Path):
    """The classic builder runs every stage in order: the first RUN of the first stage must stop it (BuildKit sets
    BUILDPLATFORM, the classic builder does not) with the reason, and let BuildKit through."""
    structure = DockerfileParser(path=str(DOCKERFILE)).structure
    first_from = next(i for i, ins in enumerate(structure) if ins["instruction"] == "FROM")
    first_stage = structure[first_from + 1 :]
    first_stage = first_stage[: next((i for i, ins in enumerate(first_stage) if ins["instruction"] == "FROM"), None)]
    guard = next(ins["value"] for ins in first_stage if ins["instruction"] == "RUN")
    classic = subprocess.run(["sh", "-c", guard], env={"PATH": os.environ["PATH"], "BUILDPLATFORM": ""},
                             capture_output=True, text=True)  # fmt: skip
    assert classic.returncode != 0 and "needs BuildKit" in classic.stderr, (guard, classic.stderr)
    buildkit = subprocess.run(["sh", "-c", guard], env={"PATH": os.environ["PATH"], "BUILDPLATFORM": "linux/amd64"},
                              capture_output=True, text=True)  # fmt: skip
    assert buildkit.returncode == 0, buildkit.stderr


TRAIN_ONLY = {"trl", "datasets", "accelerate", "peft", "matplotlib", "yaml"}  # the train extra's modules


def imported_modules(module: str, seen: set[str] | None = None) -> set[str]:
    """Top-level names of every module ``module`` imports, at any depth and in function bodies too, following the
    project's own modules."""
    seen = set() if seen is None else seen
    if module in seen:
        return set()
    seen.add(module)
    base = ROOT.joinpath(*module.split("."))
    path = base.with_suffix(".py") if base.with_suffix(".py").exists() else base / "__init__.py"
    if not path.exists():
        return set()
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        names = []
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
        for name in names:
            found.add(name.split(".")[0])
            if name.split(".")[0] in ("service", "training"):
                found |= imported_modules(name, seen)
    return found


def test_the_serving_image_keeps_only_entry_points_it_can_run():
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    removed = set(re.findall(r"/opt/venv/bin/(reward-[\w-]+)", DOCKERFILE.read_text()))  # rm'd by serve-builder
    kept = {name: target.split(":")[0] for name, target in scripts.items() if name not in removed}
    assert "reward-serve" in kept
    needs_training = {name: sorted(imported_modules(module) & TRAIN_ONLY) for name, module in kept.items()}
    assert not any(needs_training.values()), f"the serving image has no train packages for: {needs_training}"


# -- make image-test -----------------------------------------------------------------------------------------------
def docker_daemon_obtainable() -> str | None:
    """None when the image test can run here, else why not."""
    if os.environ.get("REWARD_IMAGE_TEST") == "0":
        return "REWARD_IMAGE_TEST=0"
    docker = shutil.which("docker", path="/usr/bin") or shutil.which("docker")
    if docker and subprocess.run([docker, "info"], capture_output=True).returncode == 0:
        return None
    if os.geteuid() != 0:
        return "no docker daemon answers, and starting one needs root"
    if not shutil.which("dockerd") and not shutil.which("apt-get"):
        return "no docker daemon, no dockerd, and no apt-get to install docker.io"
    return None


@pytest.mark.slow
@pytest.mark.timeout(3600)
def test_make_image_test():
    """Builds the serving image (a cold build takes minutes) and runs deploy/image_test.py's checks on it."""
    reason = docker_daemon_obtainable()
    if reason:
        pytest.skip(f"no docker daemon can be had: {reason}")
    proc = subprocess.run([sys.executable, "-m", "deploy.image_test"], cwd=ROOT, capture_output=True, text=True)
    print(proc.stdout[-6000:])
    assert proc.returncode == 0, f"{proc.stdout[-6000:]}\n{proc.stderr[-3000:]}"

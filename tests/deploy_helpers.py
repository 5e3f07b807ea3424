"""Helpers for tests/test_deploy.py: read the Dockerfile, render the kustomizations, build a tiny checkpoint.

No container engine and no cluster run here, so the deployment's contract is checked from the files themselves:

- :func:`parse_dockerfile` reads stages, ``ARG``/``ENV`` (with ``$VAR`` expansion), ``ENTRYPOINT``/``CMD``,
  ``USER``, ``EXPOSE``, ``HEALTHCHECK``, ``RUN`` and ``COPY --from`` as Docker would resolve them for a target.
- :func:`render_kustomization` is a small kustomize for what k8s/ uses (resources, components, JSON-6902 and
  strategic-merge patches, images). ``kubectl kustomize`` is the reference where it is installed
  (:func:`kubectl_kustomize`); the tests then check that both agree, and use the helper only where it is not.
- :func:`build_tiny_checkpoint` writes a random one-layer BERT reward model with an in-process tokenizer.
"""

from __future__ import annotations

import copy
import json
import re
import shlex
import shutil
import socket
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

# --------------------------------------------------------------------------------------------------------------
# Dockerfile


@dataclass
class Instruction:
    keyword: str  # upper case: FROM, RUN, ENV, ...
    args: str  # the rest of the (joined) line
    line: int


@dataclass
class Stage:
    index: int
    base: str  # the FROM image or stage name, variables expanded with the global ARGs
    name: str | None
    instructions: list[Instruction] = field(default_factory=list)


@dataclass
class ImageConfig:
    """What a target's image runs with: the stage's own instructions on top of its ancestors' (stages only)."""

    stages: list[Stage]  # ancestry, root first
    external_base: str  # the image the first ancestor starts FROM
    env: dict[str, str]
    entrypoint: list[str] | None
    cmd: list[str] | None
    user: str | None
    expose: list[str]
    healthcheck: list[str] | None  # the CMD of HEALTHCHECK (exec form), None if absent or NONE
    healthcheck_options: dict[str, str]
    workdir: str | None
    stopsignal: str | None


_VAR = re.compile(
    r"\$(?:\{(?P<braced>[A-Za-z_][A-Za-z0-9_]*)(?::(?P<op>[-+])(?P<word>[^}]*))?\}|(?P<plain>[A-Za-z_][A-Za-z0-9_]*))"
)


def expand(value: str, variables: Mapping[str, str]) -> str:
    """Docker's variable substitution: ``$VAR``, ``${VAR}``, ``${VAR:-default}``, ``${VAR:+alt}``."""

    def sub(m: re.Match) -> str:
        name = m.group("braced") or m.group("plain")
        current = variables.get(name, "")
        if m.group("op") == "-":
            return current or expand(m.group("word"), variables)
        if m.group("op") == "+":
            return expand(m.group("word"), variables) if current else ""
        return current

    return _VAR.sub(sub, value)


def _logical_lines(text: str) -> Iterator[tuple[int, str]]:
    """Instructions with continuation lines joined; comment lines (also inside a continuation) are dropped."""
    buf: list[str] = []
    start = 0
    for number, raw in enumerate(text.splitlines(), 1):
        stripped = raw.strip()
        if stripped.startswith("#"):
            continue
        if not buf:
            if not stripped:
                continue
            start = number
        if raw.rstrip().endswith("\\"):
            buf.append(raw.rstrip()[:-1])
            continue
        buf.append(raw)
        yield start, " ".join(part.strip() for part in buf if part.strip())
        buf = []
    if buf:
        yield start, " ".join(part.strip() for part in buf if part.strip())


def _split_key_values(args: str) -> list[tuple[str, str]]:
    """``KEY=value KEY2="a b"`` (or the legacy ``KEY value`` form of ENV)."""
    tokens = shlex.split(args, posix=True)
    if tokens and "=" not in tokens[0]:
        return [(tokens[0], args.split(None, 1)[1] if len(tokens) > 1 else "")]
    pairs = []
    for token in tokens:
        key, _, value = token.partition("=")
        pairs.append((key, value))
    return pairs


def _command(args: str) -> list[str]:
    """Exec form (a JSON array) as it is; shell form as Docker runs it."""
    args = args.strip()
    if args.startswith("["):
        try:
            value = json.loads(args)
        except json.JSONDecodeError:
            value = None
        if isinstance(value, list) and all(isinstance(v, str) for v in value):
            return value
    return ["/bin/sh", "-c", args]


class Dockerfile:
    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.text = self.path.read_text()
        self.global_args: dict[str, str] = {}
        self.stages: list[Stage] = []
        for line, logical in _logical_lines(self.text):
            keyword, _, rest = logical.partition(" ")
            keyword = keyword.upper()
            rest = rest.strip()
            if keyword == "FROM":
                parts = rest.split()
                parts = [p for p in parts if not p.startswith("--platform")]
                name = parts[2] if len(parts) >= 3 and parts[1].upper() == "AS" else None
                self.stages.append(Stage(len(self.stages), expand(parts[0], self.global_args), name))
            elif not self.stages:
                if keyword == "ARG":
                    key, _, default = rest.partition("=")
                    self.global_args[key.strip()] = expand(default.strip().strip('"'), self.global_args)
                # parser directives and comments before FROM are ignored
            else:
                self.stages[-1].instructions.append(Instruction(keyword, rest, line))

    # -- stages ---------------------------------------------------------------------------------------------
    def stage(self, name_or_index: str | int) -> Stage:
        for stage in self.stages:
            if stage.name == name_or_index or stage.index == name_or_index:
                return stage
        raise KeyError(f"{self.path}: no stage {name_or_index!r}")

    @property
    def stage_names(self) -> list[str | None]:
        return [s.name for s in self.stages]

    def is_stage(self, ref: str) -> bool:
        return any(s.name == ref for s in self.stages) or (ref.isdigit() and int(ref) < len(self.stages))

    def ancestry(self, name: str | int) -> list[Stage]:
        """The stage and the stages it is built FROM, root first."""
        chain = [self.stage(name)]
        while self.is_stage(chain[0].base):
            base = chain[0].base
            chain.insert(0, self.stage(int(base) if base.isdigit() else base))
        return chain

    def dependencies(self, name: str | int) -> list[Stage]:
        """Every stage a target needs: its ancestry and, recursively, the stages it copies from."""
        seen: dict[int, Stage] = {}
        todo = [self.stage(name)]
        while todo:
            stage = todo.pop()
            if stage.index in seen:
                continue
            seen[stage.index] = stage
            for ancestor in self.ancestry(stage.index):
                todo.append(ancestor)
                for ins in ancestor.instructions:
                    source = copy_from(ins)
                    if source is not None and self.is_stage(source):
                        todo.append(self.stage(int(source) if source.isdigit() else source))
        return [seen[i] for i in sorted(seen)]

    def external_images(self) -> list[str]:
        return [s.base for s in self.stages if not self.is_stage(s.base)]

    # -- resolved configuration -------------------------------------------------------------------------------
    def image_config(self, name: str | int, base_env: Mapping[str, str] | None = None) -> ImageConfig:
        """ENV/ENTRYPOINT/CMD/USER/... of a target, as Docker resolves them along the stage chain.

        ``base_env`` stands for the external base image's environment (e.g. its PATH), which this file cannot know.
        """
        chain = self.ancestry(name)
        env: dict[str, str] = dict(base_env or {})
        entrypoint: list[str] | None = None
        cmd: list[str] | None = None
        user = workdir = stopsignal = None
        expose: list[str] = []
        healthcheck: list[str] | None = None
        hc_options: dict[str, str] = {}
        for stage in chain:
            args: dict[str, str] = {}
            for ins in stage.instructions:
                scope = {**self.global_args, **args, **env}
                if ins.keyword == "ARG":
                    key, has_default, default = ins.args.partition("=")
                    key = key.strip()
                    args[key] = (
                        expand(default.strip().strip('"'), scope) if has_default else self.global_args.get(key, "")
                    )
                elif ins.keyword == "ENV":
                    for key, value in _split_key_values(ins.args):
                        env[key] = expand(value, {**self.global_args, **args, **env})
                elif ins.keyword == "ENTRYPOINT":
                    entrypoint = _command(ins.args)
                    cmd = None  # Docker: setting ENTRYPOINT resets a CMD inherited from the base
                elif ins.keyword == "CMD":
                    cmd = _command(ins.args)
                elif ins.keyword == "USER":
                    user = expand(ins.args, scope)
                elif ins.keyword == "EXPOSE":
                    expose += [expand(p, scope) for p in ins.args.split()]
                elif ins.keyword == "WORKDIR":
                    workdir = expand(ins.args, scope)
                elif ins.keyword == "STOPSIGNAL":
                    stopsignal = ins.args.strip()
                elif ins.keyword == "HEALTHCHECK":
                    healthcheck, hc_options = _healthcheck(ins.args)
        return ImageConfig(
            chain, chain[0].base, env, entrypoint, cmd, user, expose, healthcheck, hc_options, workdir, stopsignal
        )

    def runs(self, stages: Iterable[Stage]) -> list[str]:
        return [ins.args for stage in stages for ins in stage.instructions if ins.keyword == "RUN"]

    def stage_args(self, name: str | int) -> dict[str, str]:
        """ARG values (defaults) visible in a stage: the global ones it re-declares and its own."""
        values: dict[str, str] = {}
        for ins in self.stage(name).instructions:
            if ins.keyword == "ARG":
                key, has_default, default = ins.args.partition("=")
                key = key.strip()
                scope = {**self.global_args, **values}
                values[key] = (
                    expand(default.strip().strip('"'), scope) if has_default else self.global_args.get(key, "")
                )
        return values


def copy_from(ins: Instruction) -> str | None:
    if ins.keyword not in ("COPY", "ADD"):
        return None
    for token in ins.args.split():
        if token.startswith("--from="):
            return token.split("=", 1)[1]
    return None


def _healthcheck(args: str) -> tuple[list[str] | None, dict[str, str]]:
    match = re.fullmatch(r"((?:--\S+\s+)*)(CMD\s+(?P<cmd>.*)|NONE)\s*", args.strip(), flags=re.IGNORECASE | re.DOTALL)
    if not match:
        raise ValueError(f"cannot read HEALTHCHECK {args!r}")
    options = {}
    for option in match.group(1).split():
        key, _, value = option[2:].partition("=")
        options[key] = value
    return (_command(match.group("cmd")) if match.group("cmd") is not None else None), options


def parse_dockerfile(path: str | Path) -> Dockerfile:
    return Dockerfile(path)


def pip_pins(run: str) -> dict[str, str]:
    """``name==version`` requirements a RUN line passes to pip (names normalised, extras dropped)."""
    pins = {}
    for match in re.finditer(r"""["']?([A-Za-z0-9][A-Za-z0-9._-]*)(\[[^\]]*\])?==([^\s"']+)["']?""", run):
        pins[normalize_name(match.group(1))] = match.group(3)
    return pins


def normalize_name(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def dockerignore_patterns(path: str | Path) -> list[str]:
    lines = Path(path).read_text().splitlines() if Path(path).exists() else []
    return [line.strip() for line in lines if line.strip() and not line.strip().startswith("#")]


# --------------------------------------------------------------------------------------------------------------
# kustomize


class UnsupportedKustomization(NotImplementedError):
    """The helper does not implement a kustomize feature this kustomization uses (install kubectl or extend it)."""


SUPPORTED_FIELDS = {"apiVersion", "kind", "resources", "components", "patches", "images"}


def load_yaml_documents(path: str | Path) -> list[dict[str, Any]]:
    with open(path) as fh:
        return [doc for doc in yaml.safe_load_all(fh) if doc]


def kustomization_file(directory: Path) -> Path:
    for name in ("kustomization.yaml", "kustomization.yml", "Kustomization"):
        if (directory / name).is_file():
            return directory / name
    raise FileNotFoundError(f"{directory}: no kustomization file")


def render_kustomization(directory: str | Path) -> list[dict[str, Any]]:
    """The objects ``kubectl kustomize DIRECTORY`` prints, for the kustomize features listed in SUPPORTED_FIELDS."""
    directory = Path(directory).resolve()
    spec = yaml.safe_load(kustomization_file(directory).read_text()) or {}
    unsupported = set(spec) - SUPPORTED_FIELDS
    if unsupported:
        raise UnsupportedKustomization(
            f"{directory}: tests/deploy_helpers.py does not implement {sorted(unsupported)}; "
            "extend render_kustomization or run the tests where kubectl is installed"
        )
    objects: list[dict[str, Any]] = []
    for entry in spec.get("resources") or []:
        target = directory / entry
        if target.is_dir():
            objects += render_kustomization(target)
        elif target.is_file():
            objects += load_yaml_documents(target)
        else:
            raise UnsupportedKustomization(f"{directory}: resource {entry!r} is neither a file nor a folder here")
    for entry in spec.get("components") or []:
        component_dir = (directory / entry).resolve()
        component = yaml.safe_load(kustomization_file(component_dir).read_text()) or {}
        if component.get("kind") != "Component":
            raise ValueError(f"{component_dir}: a component's kind must be Component")
        objects = _apply_component(component_dir, component, objects)
    objects = _apply_patches(directory, spec.get("patches") or [], objects)
    objects = _apply_images(spec.get("images") or [], objects)
    _check_unique(objects, directory)
    return objects


def _apply_component(directory: Path, spec: dict, objects: list[dict]) -> list[dict]:
    unsupported = set(spec) - SUPPORTED_FIELDS
    if unsupported:
        raise UnsupportedKustomization(f"{directory}: component fields {sorted(unsupported)} not implemented")
    objects = list(objects)
    for entry in spec.get("resources") or []:
        target = directory / entry
        objects += render_kustomization(target) if target.is_dir() else load_yaml_documents(target)
    objects = _apply_patches(directory, spec.get("patches") or [], objects)
    return _apply_images(spec.get("images") or [], objects)


def _check_unique(objects: list[dict], directory: Path) -> None:
    seen = set()
    for obj in objects:
        key = object_key(obj)
        if key in seen:
            raise ValueError(f"{directory}: {key} is defined twice")
        seen.add(key)


def object_key(obj: Mapping[str, Any]) -> tuple[str, str, str, str]:
    group = obj.get("apiVersion", "").rpartition("/")[0]
    meta = obj.get("metadata") or {}
    return (group, obj.get("kind", ""), meta.get("namespace") or "", meta.get("name", ""))


def _matches(target: Mapping[str, Any], obj: Mapping[str, Any]) -> bool:
    api = obj.get("apiVersion", "")
    group, _, version = api.rpartition("/")
    checks = {
        "kind": obj.get("kind"),
        "name": (obj.get("metadata") or {}).get("name"),
        "namespace": (obj.get("metadata") or {}).get("namespace"),
        "group": group,
        "version": version,
    }
    for key, want in target.items():
        if key in ("labelSelector", "annotationSelector"):
            raise UnsupportedKustomization(f"patch target {key} is not implemented")
        if key not in checks:
            raise UnsupportedKustomization(f"patch target field {key!r} is not implemented")
        if not re.fullmatch(str(want), str(checks[key] or "")):
            return False
    return True


def _apply_patches(directory: Path, patches: list[dict], objects: list[dict]) -> list[dict]:
    objects = copy.deepcopy(objects)
    for patch in patches:
        unknown = set(patch) - {"path", "patch", "target", "options"}
        if unknown or patch.get("options"):
            raise UnsupportedKustomization(
                f"{directory}: patch fields {sorted(unknown | set(patch.get('options') or {}))}"
            )
        text = patch["patch"] if "patch" in patch else (directory / patch["path"]).read_text()
        body = yaml.safe_load(text)
        target = patch.get("target")
        if isinstance(body, list):  # JSON 6902
            if not target:
                raise ValueError(f"{directory}: a JSON patch needs a target")
            hits = [obj for obj in objects if _matches(target, obj)]
            if not hits:
                raise ValueError(f"{directory}: patch target {target} matches nothing")
            for obj in hits:
                for op in body:
                    json_patch(obj, op)
        elif isinstance(body, dict):  # strategic merge
            select = target or {"kind": body.get("kind"), "name": (body.get("metadata") or {}).get("name")}
            hits = [obj for obj in objects if _matches({k: v for k, v in select.items() if v}, obj)]
            if not hits:
                raise ValueError(f"{directory}: patch for {select} matches nothing")
            for obj in hits:
                merged = strategic_merge(
                    obj, {k: v for k, v in body.items() if k not in ("apiVersion", "kind")} if target else body
                )
                obj.clear()
                obj.update(merged)
        else:
            raise ValueError(f"{directory}: cannot read patch {patch}")
    return objects


def _pointer(path: str) -> list[str]:
    if path == "":
        return []
    if not path.startswith("/"):
        raise ValueError(f"bad JSON pointer {path!r}")
    return [p.replace("~1", "/").replace("~0", "~") for p in path[1:].split("/")]


def json_patch(doc: Any, op: Mapping[str, Any]) -> None:
    """One RFC 6902 operation (add, replace, remove, test) applied in place."""
    parts = _pointer(op["path"])
    if not parts:
        raise UnsupportedKustomization("patching the document root")
    parent = doc
    for part in parts[:-1]:
        parent = parent[int(part)] if isinstance(parent, list) else parent[part]
    last = parts[-1]
    kind = op["op"]
    value = copy.deepcopy(op.get("value"))
    if isinstance(parent, list):
        index = len(parent) if last == "-" else int(last)
        if kind == "add":
            parent.insert(index, value)
        elif kind == "replace":
            parent[index] = value
        elif kind == "remove":
            del parent[index]
        elif kind == "test":
            assert parent[index] == value
        else:
            raise UnsupportedKustomization(f"JSON patch op {kind!r}")
    else:
        if kind == "add":
            parent[last] = value
        elif kind == "replace":
            if last not in parent:
                raise KeyError(f"replace: {op['path']} does not exist")
            parent[last] = value
        elif kind == "remove":
            del parent[last]
        elif kind == "test":
            assert parent[last] == value
        else:
            raise UnsupportedKustomization(f"JSON patch op {kind!r}")


def strategic_merge(base: Any, patch: Any) -> Any:
    """A simplified strategic merge: maps merge, lists of named maps merge by name, other lists are replaced."""
    if isinstance(base, dict) and isinstance(patch, dict):
        out = dict(base)
        for key, value in patch.items():
            if value is None:
                out.pop(key, None)
            elif key in out:
                out[key] = strategic_merge(out[key], value)
            else:
                out[key] = copy.deepcopy(value)
        return out
    if isinstance(base, list) and isinstance(patch, list):
        if all(isinstance(x, dict) and "name" in x for x in base + patch):
            out = [copy.deepcopy(x) for x in base]
            for item in patch:
                for i, existing in enumerate(out):
                    if existing["name"] == item["name"]:
                        out[i] = strategic_merge(existing, item)
                        break
                else:
                    out.append(copy.deepcopy(item))
            return out
        return copy.deepcopy(patch)
    return copy.deepcopy(patch)


def pod_spec(obj: Mapping[str, Any]) -> dict[str, Any] | None:
    kind = obj.get("kind")
    spec = obj.get("spec") or {}
    if kind == "Pod":
        return spec
    if kind == "CronJob":
        return ((spec.get("jobTemplate") or {}).get("spec") or {}).get("template", {}).get("spec")
    if kind in ("Deployment", "StatefulSet", "DaemonSet", "ReplicaSet", "Job", "ReplicationController"):
        return (spec.get("template") or {}).get("spec")
    return None


def _apply_images(images: list[dict], objects: list[dict]) -> list[dict]:
    objects = copy.deepcopy(objects)
    for obj in objects:
        spec = pod_spec(obj)
        if not spec:
            continue
        for container in (spec.get("containers") or []) + (spec.get("initContainers") or []):
            image = container.get("image", "")
            name, tag, digest = split_image(image)
            for rule in images:
                if rule["name"] != name:
                    continue
                new_name = rule.get("newName", name)
                if rule.get("digest"):
                    container["image"] = f"{new_name}@{rule['digest']}"
                elif rule.get("newTag"):
                    container["image"] = f"{new_name}:{rule['newTag']}"
                else:
                    container["image"] = new_name + (f":{tag}" if tag else "") + (f"@{digest}" if digest else "")
    return objects


def split_image(image: str) -> tuple[str, str | None, str | None]:
    """``registry:5000/ns/name:tag@sha256:...`` into (name, tag, digest)."""
    rest, _, digest = image.partition("@")
    slash = rest.rfind("/")
    colon = rest.rfind(":")
    if colon > slash:
        return rest[:colon], rest[colon + 1 :], digest or None
    return rest, None, digest or None


def kubectl_kustomize(directory: str | Path, timeout: float = 60) -> list[dict[str, Any]] | None:
    """``kubectl kustomize DIRECTORY`` (or ``kustomize build``), parsed; None where neither is installed."""
    kubectl = shutil.which("kubectl")
    kustomize = shutil.which("kustomize")
    if kubectl:
        argv = [kubectl, "kustomize", str(directory)]
    elif kustomize:
        argv = [kustomize, "build", str(directory)]
    else:
        return None
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} failed ({proc.returncode}):\n{proc.stderr}")
    return [doc for doc in yaml.safe_load_all(proc.stdout) if doc]


# --------------------------------------------------------------------------------------------------------------
# Kubernetes quantities


_SUFFIX = {
    "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "Pi": 2**50, "Ei": 2**60,
    "n": 1e-9, "u": 1e-6, "m": 1e-3, "": 1, "k": 1e3, "M": 1e6, "G": 1e9, "T": 1e12, "P": 1e15, "E": 1e18,
}  # fmt: skip


def quantity(value: Any) -> float:
    """A Kubernetes resource quantity (``"500m"``, ``"4Gi"``, ``2``) as a number."""
    if isinstance(value, (int, float)):
        return float(value)
    match = re.fullmatch(r"([0-9.]+)([A-Za-z]*)", str(value).strip())
    if not match or match.group(2) not in _SUFFIX:
        raise ValueError(f"not a quantity: {value!r}")
    return float(match.group(1)) * _SUFFIX[match.group(2)]


# --------------------------------------------------------------------------------------------------------------
# processes and HTTP


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def http(method: str, url: str, *, body: Any = None, headers: Mapping[str, str] | None = None, timeout: float = 5):
    """(status, body bytes) of one request; connection errors raise OSError."""
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(url, data=data, method=method, headers=dict(headers or {}))
    if data is not None:
        request.add_header("Content-Type", "application/json")
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as err:
        return err.code, err.read()


def wait_until_ready(url: str, proc: subprocess.Popen, deadline_s: float, log: Path | None = None) -> int:
    """Poll ``url`` until it answers 200; fail early if the process exits. Returns the last status."""
    deadline = time.monotonic() + deadline_s
    status = None
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"the server exited with {proc.returncode} before {url} answered 200\n{tail(log)}")
        try:
            status, _ = http("GET", url, timeout=2)
            if status == 200:
                return status
        except OSError:
            pass  # not listening yet
        time.sleep(0.2)
    raise AssertionError(f"{url} did not answer 200 within {deadline_s:.0f} s (last status {status})\n{tail(log)}")


def tail(path: Path | None, chars: int = 4000) -> str:
    if path is None or not path.exists():
        return ""
    text = path.read_text(errors="replace")
    return f"--- server log (last {chars} characters) ---\n{text[-chars:]}"


def stop(proc: subprocess.Popen, sig, timeout: float) -> int | None:
    """Send ``sig`` and wait up to ``timeout``; kill it (and return None) if it does not exit."""
    if proc.poll() is not None:
        return proc.returncode
    proc.send_signal(sig)
    try:
        return proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=10)
        return None


# --------------------------------------------------------------------------------------------------------------
# a tiny checkpoint


def build_tiny_checkpoint(path: str | Path) -> Path:
    """A random one-layer BERT with one output (a reward head) and a WordLevel tokenizer, saved as safetensors.

    A plain classifier folder (no reward_manifest.json): training.checkpoint.load_checkpoint reads those with the
    default formatting recipe, as the service does.
    """
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import BertConfig, BertForSequenceClassification, PreTrainedTokenizerFast

    path = Path(path)
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    words = [
        "the",
        "a",
        "an",
        "is",
        "was",
        "not",
        "very",
        "good",
        "bad",
        "helpful",
        "harmful",
        "answer",
        "question",
        "reply",
        "hello",
        "world",
    ]
    vocab = {token: i for i, token in enumerate(specials + words)}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]",
        pair="[CLS] $A [SEP] $B [SEP]",
        special_tokens=[("[CLS]", vocab["[CLS]"]), ("[SEP]", vocab["[SEP]"])],
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        unk_token="[UNK]",
        pad_token="[PAD]",
        cls_token="[CLS]",
        sep_token="[SEP]",
        mask_token="[MASK]",
        model_max_length=128,
    )
    config = BertConfig(
        vocab_size=len(vocab),
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=32,
        max_position_embeddings=128,
        num_labels=1,
        pad_token_id=vocab["[PAD]"],
    )
    torch.manual_seed(0)
    model = BertForSequenceClassification(config)
    model.save_pretrained(str(path))  # safetensors, the only format transformers 5 writes
    fast.save_pretrained(str(path))
    return path


# --------------------------------------------------------------------------------------------------------------
# what an image's entry point imports, against what the image installs


def project_module_file(root: Path, module: str) -> Path | None:
    base = root.joinpath(*module.split("."))
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def _guarded(node: Any, parents: dict[Any, Any]) -> bool:
    """Whether an import sits in ``try: ... except ImportError`` or under ``if TYPE_CHECKING:``."""
    import ast

    child, parent = node, parents.get(node)
    while parent is not None:
        if isinstance(parent, ast.Try) and child in parent.body:
            for handler in parent.handlers:
                names = [handler.type] if not isinstance(handler.type, ast.Tuple) else list(handler.type.elts)
                if any(isinstance(n, ast.Name) and n.id in ("ImportError", "ModuleNotFoundError") for n in names):
                    return True
        if isinstance(parent, ast.If) and child in parent.body and "TYPE_CHECKING" in ast.unparse(parent.test):
            return True
        child, parent = parent, parents.get(parent)
    return False


def reachable_imports(root: Path, entry: str) -> dict[str, set[str]]:
    """Top-level third-party modules that ``entry`` (a project module) and the project modules it imports, in turn,
    import; each with the project modules that import it. Guarded imports (optional ones) are left out."""
    import ast
    import sys as _sys

    third_party: dict[str, set[str]] = {}
    seen: set[str] = set()
    todo = [entry]
    while todo:
        module = todo.pop()
        if module in seen:
            continue
        seen.add(module)
        parts = module.split(".")
        todo += [".".join(parts[:i]) for i in range(1, len(parts))]  # importing a.b runs a/__init__.py
        path = project_module_file(root, module)
        if path is None:
            continue
        tree = ast.parse(path.read_text(), filename=str(path))
        parents = {child: parent for parent in ast.walk(tree) for child in ast.iter_child_nodes(parent)}
        package = parts if path.name == "__init__.py" else parts[:-1]
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = ".".join(package[: len(package) - node.level + 1] + ([node.module] if node.module else []))
                else:
                    base = node.module or ""
                targets = [base] + [f"{base}.{alias.name}" for alias in node.names]
            else:
                continue
            if _guarded(node, parents):
                continue
            for target in targets:
                top = target.split(".")[0]
                if project_module_file(root, top) is not None:
                    if project_module_file(root, target) is not None:
                        todo.append(target)
                elif top and top not in _sys.stdlib_module_names and top != "__future__":
                    if target == targets[0] or isinstance(node, ast.Import):
                        third_party.setdefault(top, set()).add(module)
    return third_party


def requirement_closure(requirements: Iterable[str]) -> set[str]:
    """Normalised names of the distributions these requirements install, transitively (from installed metadata)."""
    from importlib import metadata

    from packaging.requirements import Requirement

    names: set[str] = set()
    todo = [(Requirement(r), {""}) for r in requirements]
    while todo:
        req, context_extras = todo.pop()
        if req.marker is not None and not any(req.marker.evaluate({"extra": e}) for e in context_extras):
            continue
        name = normalize_name(req.name)
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
    from importlib import metadata

    return {module: {normalize_name(d) for d in dists} for module, dists in metadata.packages_distributions().items()}

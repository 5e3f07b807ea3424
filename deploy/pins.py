"""The images' pins against the environment the test suite runs in.

The Dockerfile pins every package its images install (``"name==version"`` in its pip lines, torch through
``ARG TORCH_VERSION``), the Makefile pins torch (``TORCH_SPEC``) and pyproject.toml pins the build backend
(setuptools). They are meant to be the versions the tests ran with, so ``python -m deploy.pins`` (``make pins``)
compares each with the version installed in this environment and lists those that differ (exit status 1);
``--write`` rewrites them to the installed versions. ``tests/test_image.py`` runs the comparison.
"""

from __future__ import annotations

import argparse
import re
import sys
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

from packaging.utils import canonicalize_name
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[1]

# (file, pattern): each match's ``name`` group (or the fixed name) and ``version`` group is one pin
PATTERNS: list[tuple[str, str | None, re.Pattern[str]]] = [
    ("Dockerfile", None, re.compile(r'"(?P<name>[A-Za-z0-9][A-Za-z0-9._-]*)(?:\[[^\]]*\])?==(?P<version>[^"$]+)"')),
    ("Dockerfile", "torch", re.compile(r"^ARG TORCH_VERSION=(?P<version>\S+)$", re.M)),
    ("Makefile", "torch", re.compile(r"^TORCH_SPEC \?= torch==(?P<version>\S+)$", re.M)),
    ("pyproject.toml", "setuptools", re.compile(r'^requires = \["setuptools==(?P<version>[^"]+)"\]', re.M)),
]


@dataclass(frozen=True)
class Pin:
    file: str
    name: str
    version: str
    start: int  # where the version lies in the file's text
    end: int

    @property
    def installed(self) -> str | None:
        """The installed version (its public part: torch's ``+cpu`` does not count), or None."""
        try:
            return Version(metadata.version(self.name)).public
        except metadata.PackageNotFoundError:
            return None

    @property
    def current(self) -> bool:
        installed = self.installed
        return installed is not None and Version(installed) == Version(self.version)


def pins(root: Path = ROOT) -> list[Pin]:
    found = []
    for file, fixed_name, pattern in PATTERNS:
        text = (root / file).read_text()
        for match in pattern.finditer(text):
            name = canonicalize_name(fixed_name or match.group("name"))
            found.append(Pin(file, name, match.group("version"), match.start("version"), match.end("version")))
    return found


def drifted(root: Path = ROOT) -> list[Pin]:
    return [pin for pin in pins(root) if not pin.current]


def write(root: Path = ROOT) -> list[Pin]:
    """Rewrite every drifted pin that is installed here to the installed version; returns those rewritten."""
    changed = [pin for pin in drifted(root) if pin.installed is not None]
    for file in {pin.file for pin in changed}:
        text = (root / file).read_text()
        for pin in sorted((p for p in changed if p.file == file), key=lambda p: p.start, reverse=True):
            text = text[: pin.start] + str(pin.installed) + text[pin.end :]
        (root / file).write_text(text)
    return changed


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m deploy.pins", description=__doc__.split("\n\n")[0])
    parser.add_argument("--write", action="store_true", help="rewrite drifted pins to the installed versions")
    args = parser.parse_args(argv)
    if args.write:
        for pin in write():
            print(f"{pin.file}: {pin.name} {pin.version} -> {pin.installed}")
    stale = drifted()
    for pin in stale:
        print(f"{pin.file}: {pin.name}=={pin.version}, installed here: {pin.installed or 'not installed'}")
    if not stale:
        print(f"{len(pins())} pins, all the versions installed in {sys.prefix}")
    return 1 if stale else 0


if __name__ == "__main__":
    sys.exit(main())

"""Packaging hygiene: the license pyproject declares, a Keep a Changelog file, project metadata, dependency bounds,
and the lock file the Docker image installs from (complete, hashed, and agreeing with pyproject)."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path
from typing import Any

from packaging.markers import default_environment
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

ROOT = Path(__file__).resolve().parent.parent
LOCK = ROOT / "requirements.lock"
# The image's interpreter and platform (Dockerfile: python:3.11-slim-bookworm).
IMAGE_ENVIRONMENT: dict[str, str] = {
    **{key: str(value) for key, value in default_environment().items()},
    "python_version": "3.11",
    "python_full_version": "3.11.14",
    "sys_platform": "linux",
    "platform_system": "Linux",
    "implementation_name": "cpython",
    "platform_python_implementation": "CPython",
}


def pyproject() -> dict[str, Any]:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def locked() -> dict[str, tuple[Version, list[str]]]:
    """name -> (pinned version, sha256 hashes) for every requirement in the lock that applies to the image."""
    text = re.sub(r"\\\n\s*", " ", LOCK.read_text())
    pins: dict[str, tuple[Version, list[str]]] = {}
    for line in text.splitlines():
        line = line.split(" #", 1)[0].strip()
        if not line or line.startswith("#"):
            continue
        spec, *options = line.split(" --hash=")
        requirement = Requirement(spec.strip())
        if requirement.marker is not None and not requirement.marker.evaluate(IMAGE_ENVIRONMENT):
            continue
        (pin,) = requirement.specifier
        assert pin.operator == "==", f"{requirement} is not pinned"
        pins[canonicalize_name(requirement.name)] = (Version(pin.version), [o.strip() for o in options])
    return pins


def test_the_license_is_the_mit_license_pyproject_declares() -> None:
    assert pyproject()["project"]["license"] == "MIT"
    text = (ROOT / "LICENSE").read_text()
    assert text.startswith("MIT License\n") and "Copyright (c)" in text and "pricegate contributors" in text
    assert 'THE SOFTWARE IS PROVIDED "AS IS"' in text


def test_the_changelog_keeps_a_changelog() -> None:
    text = (ROOT / "CHANGELOG.md").read_text()
    assert "keepachangelog.com" in text
    versions = re.findall(r"^## \[([^\]]+)\]", text, re.MULTILINE)
    assert versions[0] == "Unreleased"
    assert pyproject()["project"]["version"] in versions
    for version in versions:  # every version heading has its link
        assert re.search(rf"^\[{re.escape(version)}\]: https://", text, re.MULTILINE), version
    for section in re.findall(r"^### (.+)$", text, re.MULTILINE):
        assert section in {"Added", "Changed", "Deprecated", "Removed", "Fixed", "Security"}, section


def test_project_metadata_has_urls_classifiers_and_upper_bounds() -> None:
    project = pyproject()["project"]
    assert {"Homepage", "Repository", "Changelog", "Issues"} <= set(project["urls"])
    assert "License :: OSI Approved :: MIT License" not in project["classifiers"]  # PEP 639: the license expression
    python = [c for c in project["classifiers"] if c.startswith("Programming Language :: Python :: 3.")]
    assert python == ["Programming Language :: Python :: 3.11"]  # what CI and the image run
    # A new major version of any runtime dependency may break us: each has an upper bound.
    for dependency in project["dependencies"]:
        requirement = Requirement(dependency)
        assert any(spec.operator == "<" for spec in requirement.specifier), f"{dependency} has no upper bound"


def test_the_lock_pins_every_runtime_dependency_within_pyprojects_ranges_with_hashes() -> None:
    pins = locked()
    assert pins, "requirements.lock is empty"
    regenerate = "regenerate requirements.lock (README 'Container image')"
    for dependency in pyproject()["project"]["dependencies"]:
        requirement = Requirement(dependency)
        if requirement.marker is not None and not requirement.marker.evaluate(IMAGE_ENVIRONMENT):
            continue
        name = canonicalize_name(requirement.name)
        assert name in pins, f"{requirement.name} is not in requirements.lock: {regenerate}"
        version, _ = pins[name]
        assert requirement.specifier.contains(version, prereleases=True), f"{name}=={version} ∉ {requirement}"
    for pinned, (_, hashes) in pins.items():
        assert hashes and all(re.fullmatch(r"sha256:[0-9a-f]{64}", h) for h in hashes), f"{pinned} has no sha256 hash"


def test_the_image_installs_from_the_lock() -> None:
    dockerfile = re.sub(r"\\\n", " ", (ROOT / "Dockerfile").read_text())
    runs = [line.strip() for line in dockerfile.splitlines() if line.strip().startswith("RUN ")]
    installs = [run for run in runs if " install " in run]
    assert any("--require-hashes" in run and "-r requirements.lock" in run for run in installs), installs
    # pricegate itself adds nothing unlocked, and the result is checked.
    (own,) = [run for run in installs if re.search(r"install (--\S+ )*\.( |$)", run)]
    assert "--no-deps" in own and "pip check" in own
    assert "COPY requirements.lock" in dockerfile
    assert "requirements.lock" not in (ROOT / ".dockerignore").read_text().split()

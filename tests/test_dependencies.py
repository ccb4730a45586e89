"""pyproject.toml's bounds and constraints.txt agree with each other and with the environment
the suite runs in (the versions it passes with are the ones pinned)."""

from __future__ import annotations

import re
import tomllib
from importlib import metadata
from pathlib import Path

from packaging.requirements import Requirement
from packaging.version import Version

ROOT = Path(__file__).resolve().parent.parent


def _canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _pins() -> dict[str, str]:
    pins = {}
    for line in (ROOT / "constraints.txt").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            name, _, version = line.partition("==")
            pins[_canonical(name)] = version.strip()
    return pins


def _requirements() -> list[Requirement]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    texts = list(project["dependencies"])
    for extra in project["optional-dependencies"].values():
        texts += extra
    return [Requirement(text) for text in texts]


def test_torch_diffusers_transformers_are_bounded_below_their_next_minor():
    by_name = {_canonical(r.name): r for r in _requirements()}
    for name in ("torch", "diffusers", "transformers"):
        spec = by_name[name].specifier
        upper = [s for s in spec if s.operator == "<"]
        assert upper, f"{name} has no upper bound"
        lower = Version(next(s.version for s in spec if s.operator == ">="))
        assert Version(upper[0].version) == Version(f"{lower.major}.{lower.minor + 1}"), spec


def test_every_pin_satisfies_the_bounds_and_is_what_is_installed():
    pins = _pins()
    for requirement in _requirements():
        name = _canonical(requirement.name)
        if name in pins:
            assert requirement.specifier.contains(pins[name], prereleases=True), (requirement, pins[name])
    for name in ("torch", "diffusers", "transformers", "pyzmq", "pydantic", "numpy"):
        assert name in pins, f"{name} is not pinned"
    for name, version in pins.items():
        try:
            installed = metadata.version(name).split("+")[0]
        except metadata.PackageNotFoundError:
            continue   # an extra this environment does not install
        assert installed == version, f"{name}: constraints.txt pins {version}, {installed} is installed"


def test_setup_env_installs_torch_first_then_the_project_with_the_constraints():
    script = (ROOT / "scripts" / "setup_env.sh").read_text()
    assert 'TORCH_SPEC="${TORCH_SPEC:-torch==2.13.0}"' in script
    torch_line = script.index('install "${CONSTRAINTS[@]}" $TORCH_SPEC')
    project_line = script.index('install "${CONSTRAINTS[@]}" -e "$ROOT[test]"')
    assert torch_line < project_line
    assert 'CONSTRAINTS=(-c "$ROOT/constraints.txt")' in script

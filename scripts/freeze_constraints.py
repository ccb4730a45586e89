"""Write constraints.txt: the exact versions, in the current environment, of everything the
project needs (its dependencies and the extras that are installed, and all of theirs), so that
scripts/setup_env.sh installs the same stack on every machine.

    python scripts/freeze_constraints.py            # rewrite constraints.txt from this venv
    python scripts/freeze_constraints.py --check    # exit 1 when constraints.txt differs

Run it after a deliberate upgrade once the whole suite passes (docs/dependencies.md). Packages
other helpers or tools installed into the venv but the project does not need are left out.
Local version labels are dropped (torch 2.13.0+cpu -> torch==2.13.0), so the CUDA build of the
same version a GPU user installs through TORCH_SPEC satisfies the constraint too.
"""

from __future__ import annotations

import argparse
import re
import sys
import tomllib
from importlib import metadata
from pathlib import Path

from packaging.requirements import Requirement

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "constraints.txt"
HEADER = """\
# The exact versions the test suite passed with (pip freeze of the project's dependencies,
# and theirs). scripts/setup_env.sh installs with `-c constraints.txt`; to upgrade on purpose,
# follow docs/dependencies.md, then regenerate: python scripts/freeze_constraints.py
"""


def _canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def project_requirements() -> list[Requirement]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    requirements = [Requirement(text) for text in project.get("dependencies", [])]
    for extra in project.get("optional-dependencies", {}).values():
        requirements += [Requirement(text) for text in extra]
    return requirements


def no_deps_installs() -> list[Requirement]:
    """Packages scripts/setup_env.sh installs with --no-deps (outside pyproject.toml): pinned
    too, without their own requirements."""
    script = (ROOT / "scripts" / "setup_env.sh").read_text()
    return [Requirement(spec) for spec in
            re.findall(r'install --no-deps "\$\{CONSTRAINTS\[@\]\}" "([^"]+)"', script)]


def closure(requirements: list[Requirement]) -> dict[str, str]:
    """{distribution name: installed version} of every installed requirement and its own
    requirements (markers evaluated for this platform; extras followed)."""
    found: dict[str, str] = {}
    todo = list(requirements)
    while todo:
        req = todo.pop()
        if req.marker is not None and "extra" not in str(req.marker) \
                and not req.marker.evaluate({"extra": ""}):
            continue   # another platform's requirement (extras were checked by the parent)
        try:
            dist = metadata.distribution(req.name)
        except metadata.PackageNotFoundError:   # an extra nobody installed (e.g. directml)
            continue
        name = _canonical(dist.metadata["Name"])
        if name in found:
            continue
        found[name] = dist.version.split("+")[0]
        for text in dist.requires or []:
            child = Requirement(text)
            if child.marker is not None and "extra" in str(child.marker):
                if not any(child.marker.evaluate({"extra": e}) for e in req.extras):
                    continue
            elif child.marker is not None and not child.marker.evaluate({"extra": ""}):
                continue
            todo.append(child)
    found.pop("sdxl-broker", None)
    return found


def render(pins: dict[str, str]) -> str:
    return HEADER + "".join(f"{name}=={version}\n" for name, version in sorted(pins.items()))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="only compare, exit 1 on a difference")
    args = parser.parse_args(argv)
    pins = closure(project_requirements())
    for requirement in no_deps_installs():
        try:
            pins.setdefault(_canonical(requirement.name),
                            metadata.version(requirement.name).split("+")[0])
        except metadata.PackageNotFoundError:
            pass
    text = render(pins)
    if args.check:
        current = OUT.read_text() if OUT.exists() else ""
        if current != text:
            print("constraints.txt does not match this environment; run "
                  "python scripts/freeze_constraints.py", file=sys.stderr)
            return 1
        return 0
    OUT.write_text(text)
    print(f"wrote {OUT} ({text.count('==')} pins)")
    return 0


if __name__ == "__main__":
    sys.exit(main())

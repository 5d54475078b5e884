#!/usr/bin/env python
"""Check, without Docker, that the Dockerfile's install resolves against its base image's torch.

The Dockerfile pins its base image, the torch version string that image ships (``BASE_IMAGE_TORCH``)
and the megatron-core it installs (``MEGATRON_CORE_VERSION``); the install runs with that torch as a
constraint, so every ``torch`` requirement of megatron-core and of megatron-rift must accept it.
NVIDIA's images ship pre-releases (``2.9.0a0+...``): pip accepts an installed pre-release that a
constraint names, so what matters is the ordering (``2.6.0a0`` is below ``>=2.6.0``; ``2.9.0a0`` is
above it).

    python scripts/check_docker_resolution.py [--dockerfile Dockerfile]

Reads megatron-core's requirements from the installed package when it is the pinned version, else
from its wheel (``pip download --no-deps``). Exit 0 when every requirement accepts the image's
torch, 1 otherwise.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import re
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from packaging.requirements import Requirement
from packaging.version import Version

REPO = Path(__file__).resolve().parents[1]


def dockerfile_args(path: Path) -> dict[str, str]:
    """``ARG NAME=value`` lines of a Dockerfile."""
    return dict(re.findall(r"^ARG\s+(\w+)=(\S+)", path.read_text(), flags=re.MULTILINE))


def megatron_core_requirements(version: str) -> list[str]:
    try:
        if importlib.metadata.version("megatron-core") == version:
            return list(importlib.metadata.requires("megatron-core") or ())
    except importlib.metadata.PackageNotFoundError:
        pass
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run(
            [
                sys.executable,
                "-m",
                "pip",
                "download",
                "-q",
                "--no-deps",
                "--only-binary=:all:",
                "--python-version",
                "3.12",
                "--platform",
                "manylinux_2_28_x86_64",
                f"megatron-core=={version}",
                "-d",
                tmp,
            ],
            check=True,
        )
        wheel = next(Path(tmp).glob("*.whl"))
        with zipfile.ZipFile(wheel) as archive:
            name = next(n for n in archive.namelist() if n.endswith(".dist-info/METADATA"))
            text = archive.read(name).decode()
    return [
        line.split(":", 1)[1].strip()
        for line in text.splitlines()
        if line.startswith("Requires-Dist:")
    ]


def project_requirements() -> list[str]:
    text = (REPO / "pyproject.toml").read_text()
    block = text.split("dependencies = [", 1)[1].split("]", 1)[0]
    return re.findall(r'"([^"]+)"', block)


def torch_problems(torch_version: str, requirements: list[str]) -> list[str]:
    """The torch requirements (outside extras) that ``torch_version`` does not satisfy."""
    version = Version(torch_version)
    problems = []
    for line in requirements:
        requirement = Requirement(line)
        if requirement.name != "torch":
            continue
        if requirement.marker is not None and "extra" in str(requirement.marker):
            continue
        if not requirement.specifier.contains(version, prereleases=True):
            problems.append(f"{line} does not accept torch {torch_version}")
    return problems


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dockerfile", type=Path, default=REPO / "Dockerfile")
    args = parser.parse_args(argv)
    pins = dockerfile_args(args.dockerfile)
    base, torch_version, mcore = (
        pins["BASE_IMAGE"],
        pins["BASE_IMAGE_TORCH"],
        pins["MEGATRON_CORE_VERSION"],
    )
    problems = torch_problems(
        torch_version, megatron_core_requirements(mcore) + project_requirements()
    )
    for problem in problems:
        print(f"{args.dockerfile}: {problem}", file=sys.stderr)
    if not problems:
        print(
            f"ok: {base} (torch {torch_version}) satisfies megatron-core=={mcore} and megatron-rift"
        )
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())

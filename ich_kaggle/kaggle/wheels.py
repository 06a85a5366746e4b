"""Collect wheels offline for the Kaggle code dataset (Kaggle kernels that score a competition run without internet).

Three sources, in order of preference: our own project (built with `pip wheel --no-deps --no-build-isolation` from a
clean copy of the source, so the shared working tree gets no build/ or egg-info litter), a real wheel left in pip's
local cache, or a wheel re-packed from the installed distribution's files (its dist-info RECORD lists them all).
"""

from __future__ import annotations

import logging
import base64
import csv
import hashlib
import importlib.metadata as md
import io
import os
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from ..core.errors import UserError

log = logging.getLogger(__name__)

PROJECT_ROOT = Path(__file__).resolve().parents[2]
PIP_CACHE = Path(os.environ.get("PIP_CACHE_DIR", Path.home() / ".cache" / "pip"))


@dataclass(frozen=True)
class Wheel:
    path: Path
    name: str  # distribution name as installed, e.g. "pylibjpeg-libjpeg"
    version: str
    source: str  # built | cache | repacked

    @property
    def pure(self) -> bool:
        """A `py3-none-any` wheel installs on any Python; binary ones only on the interpreter they were built for."""
        return self.path.name.endswith("-none-any.whl")


def normalize(name: str) -> str:
    return re.sub(r"[-_.]+", "_", name).lower()


def wheel_tag(dist: md.Distribution) -> str:
    """The file-name tag of the wheel a distribution came from, e.g. `py2.py3-none-any` (compressed tag set)."""
    text = dist.read_text("WHEEL") or ""
    tags = [line.split(":", 1)[1].strip().split("-") for line in text.splitlines() if line.startswith("Tag:")]
    tags = [t for t in tags if len(t) == 3]
    if not tags:
        return "py3-none-any"
    parts = [sorted({t[i] for t in tags}) for i in range(3)]
    if len(parts[0]) * len(parts[1]) * len(parts[2]) == len({tuple(t) for t in tags}):
        return "-".join(".".join(p) for p in parts)
    return "-".join(tags[0])


def build_project_wheel(dest: Path, root: Path = PROJECT_ROOT) -> Wheel:
    """`pip wheel` our project from a throw-away copy of pyproject.toml + the package."""
    if not (root / "pyproject.toml").is_file():
        return repack_installed("ich_kaggle", dest)
    dest.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="ich-wheel-") as tmp:
        src = Path(tmp) / "src"
        src.mkdir()
        shutil.copy2(root / "pyproject.toml", src / "pyproject.toml")
        shutil.copytree(
            root / "ich_kaggle", src / "ich_kaggle", ignore=shutil.ignore_patterns("__pycache__", "*.pyc", ".*")
        )
        built = Path(tmp) / "out"
        cmd = [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "--no-index",
            "--quiet",
            "--wheel-dir",
            str(built),
            str(src),
        ]
        result = subprocess.run(cmd, capture_output=True, text=True)
        if result.returncode != 0:
            last = (result.stderr.strip().splitlines() or ["no output"])[-1]
            raise UserError(
                f"building the ich_kaggle wheel from {root / 'pyproject.toml'} failed ({last}); "
                f"check that setuptools is installed in {sys.prefix}"
            )
        (whl,) = built.glob("*.whl")
        target = dest / whl.name
        shutil.move(str(whl), target)
    version = whl.name.split("-")[1]
    return Wheel(target, "ich_kaggle", version, "built")


def cached_wheel(name: str, version: str) -> Path | None:
    """A wheel pip built earlier for exactly this version (pip keeps sdist builds under cache/wheels/)."""
    root = PIP_CACHE / "wheels"
    if not root.is_dir():
        return None
    for path in sorted(root.rglob("*.whl")):
        parts = path.name.split("-")
        if len(parts) >= 5 and normalize(parts[0]) == normalize(name) and parts[1] == version:
            return path
    return None


def _record_line(arcname: str, data: bytes) -> list[str]:
    digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
    return [arcname, f"sha256={digest}", str(len(data))]


def repack_installed(name: str, dest: Path) -> Wheel:
    """Rebuild a wheel from an installed distribution: every file its RECORD lists inside site-packages."""
    try:
        dist = md.distribution(name)
    except md.PackageNotFoundError:
        raise UserError(
            f"package '{name}' is not installed in {sys.prefix}; install it (pip install {name}) "
            f"so its wheel can be packed for the offline kernel"
        ) from None
    dist_name = dist.metadata["Name"]
    version = dist.version
    base = Path(str(dist.locate_file("")))
    records: list[list[str]] = []
    buffer = io.BytesIO()
    dist_info = None
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as zf:
        for file in dist.files or []:
            rel = file.as_posix()
            if rel.startswith("..") or "__pycache__" in rel or rel.endswith(".pyc"):
                continue  # scripts in bin/ and byte-code are regenerated by pip
            if rel.endswith(".dist-info/RECORD"):
                dist_info = rel.rsplit("/", 1)[0]
                continue
            if rel.endswith((".dist-info/INSTALLER", ".dist-info/REQUESTED", ".dist-info/direct_url.json")):
                continue  # written by the installer, not part of a wheel
            path = base / rel
            if not path.is_file():
                continue
            data = path.read_bytes()
            zf.writestr(rel, data)
            records.append(_record_line(rel, data))
        if dist_info is None:
            raise UserError(
                f"{name} {version}: no RECORD in its dist-info, cannot re-pack it; "
                f"reinstall it with pip (pip install --force-reinstall {name}=={version})"
            )
        out = io.StringIO()
        writer = csv.writer(out, lineterminator="\n")
        writer.writerows(records)
        writer.writerow([f"{dist_info}/RECORD", "", ""])
        zf.writestr(f"{dist_info}/RECORD", out.getvalue())
    dest.mkdir(parents=True, exist_ok=True)
    target = dest / f"{normalize(dist_name)}-{version}-{wheel_tag(dist)}.whl"
    target.write_bytes(buffer.getvalue())
    return Wheel(target, dist_name, version, "repacked")


def collect(packages: list[str] | tuple[str, ...], dest: Path) -> list[Wheel]:
    """Our project's wheel plus one wheel per installed package: a cached real wheel if any, else re-packed."""
    wheels = [build_project_wheel(dest)]
    for name in packages:
        try:
            version = md.version(name)
        except md.PackageNotFoundError:
            raise UserError(
                f"package '{name}' is not installed in {sys.prefix}; install it or drop it from "
                f"ich_kaggle.kernel.KERNEL_PACKAGES"
            ) from None
        cached = cached_wheel(name, version)
        if cached is not None:
            target = dest / cached.name
            shutil.copy2(cached, target)
            wheels.append(Wheel(target, name, version, "cache"))
        else:
            wheels.append(repack_installed(name, dest))
    for w in [w for w in wheels[1:] if not w.pure]:  # binary wheels: also for the kernel's interpreter
        wheels += download_for_kernel(w.name, w.version, dest)
    return wheels


# Kaggle's image (3.12 since December 2025) and Colab's, its base (3.13 since August 2026); the wheels here are built
# for this machine's Python
KERNEL_PYTHONS = ("3.12", "3.13")
KERNEL_PLATFORMS = ("manylinux_2_28_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64")


def download_for_kernel(name: str, version: str, dest: Path) -> list[Wheel]:
    """`pip download` of name==version's wheel for each of KERNEL_PYTHONS (needs the package index once, at dataset
    build time; the kernel itself stays offline). A wheel that cannot be fetched is named in the log, not fatal:
    the kernel then says which package did not install."""
    out = []
    for py in KERNEL_PYTHONS:
        # this version, else the newest older one that publishes a wheel for `py` (pylibjpeg-libjpeg 2.5.0 has
        # only cp311; 2.4.0 has cp312 and cp313)
        for spec in (f"{name}=={version}", f"{name}<{version}"):
            found, last = _download(spec, py)
            if found is not None:
                break
        if found is None:
            log.warning(
                f"no {name} wheel for Python {py} ({last}); a kernel on Python {py} will report it as not installed"
            )
            continue
        target = dest / found.name
        if not target.exists():
            shutil.copy2(found, target)
            out.append(Wheel(target, name, found.name.split("-")[1], f"pypi (Python {py})"))
        shutil.rmtree(found.parent, ignore_errors=True)
    return out


def _download(spec: str, py: str) -> tuple[Path | None, str]:
    """One binary wheel of `spec` for Python `py` on Kaggle's platform into a temporary folder, or (None, why)."""
    tmp = Path(tempfile.mkdtemp(prefix="ich-wheel-"))
    cmd = [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--quiet",
        "--no-deps",
        "--only-binary=:all:",
        "--python-version",
        py,
        *[a for plat in KERNEL_PLATFORMS for a in ("--platform", plat)],
        "-d",
        str(tmp),
        spec,
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    found = sorted(tmp.glob("*.whl"))
    if proc.returncode != 0 or not found:
        shutil.rmtree(tmp, ignore_errors=True)
        return None, (proc.stderr.strip().splitlines() or ["no wheel"])[-1]
    return found[0], ""

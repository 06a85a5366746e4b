# The install step of every kernel script (inference, prepare, training), in one place: `build.embed_install` puts
# this file's text, placeholders filled, where a template imports from it (the import marked `# __INSTALL__`).
# It runs without internet: finds the attached code dataset under the input root and installs ich_kaggle and the
# packages Kaggle's image lacks from it (`pip install --no-index --find-links`).

import json
import os
import subprocess
import sys
import time
from pathlib import Path

# Filled in by `build.embed_install`.
CONFIG_NAME = "__CONFIG_NAME__"
CODE_DATASET = "__CODE_DATASET__"
MODEL_DATASET = "__MODEL_DATASET__"
ICH_KAGGLE_VERSION = "__ICH_KAGGLE_VERSION__"

INPUT = Path(os.environ.get("ICH_KAGGLE_INPUT", "/kaggle/input"))
WORKING = Path(os.environ.get("ICH_KAGGLE_WORKING", "/kaggle/working"))
# Image cache and intermediate files: not in the working folder, whose contents Kaggle saves as output (20 GB cap).
SCRATCH = Path(os.environ.get("ICH_KAGGLE_SCRATCH", "/tmp/ich_kaggle"))
SKIP_DIRS = {"stage_2_train", "stage_2_test", "stage_1_train_images", "stage_1_test_images"}  # huge DICOM folders


def log(message):
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


def find_code_dir(root, max_depth=5):
    """The folder of the code dataset: the one holding the ich_kaggle wheel (nearest the root first)."""
    found = []
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        depth = len(Path(dirpath).relative_to(root).parts)
        dirnames[:] = sorted(d for d in dirnames if d not in SKIP_DIRS and depth < max_depth)
        if any(f.startswith("ich_kaggle-") and f.endswith(".whl") for f in filenames):
            found.append((depth, dirpath))
    if not found:
        sys.exit(
            f"error: no ich_kaggle-*.whl under {root}; attach the dataset {CODE_DATASET} to this kernel "
            f"(or set ICH_KAGGLE_INPUT to the folder that holds it)"
        )
    return Path(min(found)[1])


def _pip(args):
    """pip, offline and quiet; (ok, its last output line)."""
    cmd = [
        sys.executable,
        "-m",
        "pip",
        "install",
        "--no-index",
        "--find-links",
        str(args[0]),
        "--no-deps",
        "--quiet",
        "--disable-pip-version-check",
        "--no-warn-script-location",
        *args[1:],
    ]
    result = subprocess.run(cmd, capture_output=True, text=True)
    lines = (result.stderr.strip() or result.stdout.strip()).splitlines()
    return result.returncode == 0, lines[-1] if lines else ""


def _installed(name):
    """The version of `name` already in this image, or None."""
    import importlib.metadata as md

    try:
        return md.version(name)
    except md.PackageNotFoundError:
        return None


def pip_install(code_dir):
    """Required packages in one pip call; optional ones (wheels.json says which and why) one by one: one that does
    not install on this Python is named in the log and the run goes on. By name, not version: pip picks, among the
    dataset's wheels, the newest built for this interpreter (an older version where the newest has no wheel for
    it). A required package the image already ships is kept as it is when the dataset has no wheel for this
    Python (no exact pin on what the image ships)."""
    listing = json.loads((code_dir / "wheels.json").read_text())
    wheels = listing["wheels"]
    names = list(dict.fromkeys(w["name"] for w in wheels))
    optional = {w["name"]: w for w in wheels if w.get("optional")}
    # our own wheel always goes into this interpreter's site-packages, even where another ich_kaggle is visible (an
    # editable install of the project on a path this Python also reads), which pip would take as installed
    ok, last = _pip([code_dir, "--ignore-installed", "ich_kaggle"])
    if not ok:
        sys.exit(f"error: pip could not install ich_kaggle from {code_dir} on Python {sys.version.split()[0]}: {last}")
    required = [n for n in names if n not in optional and n != "ich_kaggle"]
    ok, last = _pip([code_dir] + required)
    if not ok:
        for name in required:
            ok, last = _pip([code_dir, name])
            if ok:
                continue
            have = _installed(name)
            if have is None:
                sys.exit(
                    f"error: pip could not install the required package {name} from {code_dir} on Python "
                    f"{sys.version.split()[0]}: {last}"
                )
            log(
                f"keeping the image's {name} {have}: the code dataset has no wheel of it for Python "
                f"{sys.version.split()[0]} ({last})"
            )
    missing = []
    for name, w in optional.items():
        ok, last = _pip([code_dir, name])
        if not ok:
            missing.append(w)
            log(
                f"optional package {name} not installed on Python {sys.version.split()[0]} "
                f"({w.get('why', 'optional')}): {last}"
            )
    log(
        f"installed {len(names) - len(missing)} of {len(names)} packages"
        + (f"; going on without {', '.join(w['name'] for w in missing)}" if missing else "")
    )
    return missing

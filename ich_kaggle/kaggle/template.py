"""Offline Kaggle kernel for the RSNA Intracranial Hemorrhage Detection competition, written by `make kernel`.

It runs without internet: installs ich_kaggle and the few packages Kaggle's image lacks from the attached code
dataset (`pip install --no-index --find-links`), finds the competition files and the model dataset (the model
bundle) by searching the input root (mount paths differ between old and new kernels), runs the bundle's chosen
pipeline on the test images, keeping each fold's predictions in the working folder as it finishes (a new version
attaching this output resumes from them), and writes `submission.csv` (checked by the validator).

Outside Kaggle: ICH_KAGGLE_INPUT=<folder in the /kaggle/input layout> ICH_KAGGLE_WORKING=<out folder>
[ICH_KAGGLE_SCRATCH=<folder for the image cache, default /tmp/ich_kaggle>] python kernel.py
"""

import os
import sys
import time
from pathlib import Path

from ich_kaggle.kaggle.kernel_install import (  # __INSTALL__: build.embed_install puts that file's text here
    CONFIG_NAME,
    ICH_KAGGLE_VERSION,
    INPUT,
    SCRATCH,
    WORKING,
    find_code_dir,
    log,
    pip_install,
)

# Which members and folds this kernel predicts (None: all); build.build_kernel writes `make kernel MEMBERS= FOLDS=`.
PART = {"members": None, "folds": None}  # __PART__: written by build.build_kernel


def main():
    started = time.time()
    os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")  # albumentations would look for updates online at import
    log(f"input {INPUT}, working {WORKING}, scratch {SCRATCH}, config {CONFIG_NAME}")
    code_dir = find_code_dir(INPUT)
    log(f"installing from {code_dir}")
    pip_install(code_dir)
    import importlib

    importlib.invalidate_caches()
    import ich_kaggle
    from ich_kaggle.core.errors import UserError
    from ich_kaggle.kaggle import run as kernel_run
    from ich_kaggle.core import log as library_log

    library_log.show()  # the library's messages in the kernel's log

    log(f"using ich_kaggle {ich_kaggle.__version__} from {Path(ich_kaggle.__file__).parent}")
    if ich_kaggle.__version__ != ICH_KAGGLE_VERSION:
        log(f"warning: installed ich_kaggle {ich_kaggle.__version__}, kernel written by {ICH_KAGGLE_VERSION}")
    try:
        model = kernel_run.find_bundle(INPUT, config_name=CONFIG_NAME)
        competition = kernel_run.find_test_competition(INPUT)
        previous = kernel_run.find_previous(INPUT)
        log(f"competition {competition}, model {model}, previous outputs {[str(p) for p in previous]}, part {PART}")
        out = kernel_run.run_kernel(
            model,
            competition,
            WORKING,
            previous=previous,
            members=PART["members"],
            folds=PART["folds"],
            scratch=SCRATCH,
        )
    except UserError as e:
        sys.exit(f"error: {e}")
    log(f"wrote {out} in {time.time() - started:.0f} s" if out else f"stopped after {time.time() - started:.0f} s")


if __name__ == "__main__":
    main()

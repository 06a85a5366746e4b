"""Kaggle kernel for the RSNA Intracranial Hemorrhage Detection competition, written by `make kernel-train`,
`make kernel-prepare` or `make kernel-from-folds` (MODE below).

It runs without internet: installs ich_kaggle from the attached code dataset, finds the competition under the input
root, and then
- gpu-check: measures one T4's training and inference images/s for each backbone and size in FOLDS into
  rates.yaml (make kernel-gpu-check-fetch turns it into kaggle_rates.yaml);
- prepare: scans every DICOM header and writes meta.csv + folds.csv (patient-grouped, K and SEED below) to the
  working folder, the output every training kernel attaches;
- infer: predicts the test images (TTA) with the attached training kernels' folds (FOLDS), first stage only, and
  writes the validated submission.csv, as the inference kernel does from a model dataset;
- train: caches the train images on the scratch disk where they fit, else reads them from their DICOMs (the log says
  which), trains fold FOLD of CONFIG_NAME (torchrun on both GPUs of a T4 x2, one process otherwise) into
  working/runs/<config>/fold<N>/, resuming from the previous version's output when it is attached. EPOCHS_PER_RUN
  (if set) ends each run resumably after that many more epochs.

Outside Kaggle: ICH_KAGGLE_INPUT=<folder in the /kaggle/input layout> ICH_KAGGLE_WORKING=<out folder>
[ICH_KAGGLE_SCRATCH=<folder for the image cache, default /tmp/ich_kaggle>] python kernel.py
"""

import os
import sys
import time
from pathlib import Path

from ich_kaggle.kaggle.kernel_install import (  # __INSTALL__: build.embed_install puts that file's text here
    CONFIG_NAME,
    INPUT,
    SCRATCH,
    WORKING,
    find_code_dir,
    log,
    pip_install,
)

MODE = "__MODE__"
FOLD = "__FOLD__"
FOLDS = "__FOLDS__"  # infer: the folds whose training kernels are attached
K = "__K__"
SEED = "__SEED__"
CONFIG_YAML = "__CONFIG_YAML__"  # the resolved config, so a YAML file of the user's travels too
EPOCHS_PER_RUN = "__EPOCHS_PER_RUN__"  # None: train to the end


def main():
    started = time.time()
    os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
    log(f"{MODE}: input {INPUT}, working {WORKING}, scratch {SCRATCH}, config {CONFIG_NAME}")
    code_dir = find_code_dir(INPUT)
    log(f"installing from {code_dir}")
    pip_install(code_dir)
    import importlib

    importlib.invalidate_caches()
    import ich_kaggle
    from ich_kaggle.core.errors import UserError
    from ich_kaggle.kaggle import train_run
    from ich_kaggle.core import log as library_log

    library_log.show()  # the library's messages in the kernel's log

    log(f"using ich_kaggle {ich_kaggle.__version__} from {Path(ich_kaggle.__file__).parent}")
    try:
        if MODE == "gpu-check":
            out = train_run_gpu_check(FOLDS)
        elif MODE == "prepare":
            out = train_run.run_prepare(train_run.find_competition(INPUT), WORKING, k=K, seed=SEED)
        elif MODE == "infer":
            from ich_kaggle.kaggle import run as kernel_run

            import yaml
            from ich_kaggle.core import config

            cfg = config.from_dict(yaml.safe_load(CONFIG_YAML), source="kernel.py CONFIG_YAML") if CONFIG_YAML else None
            model = train_run.assemble_model(INPUT, CONFIG_NAME, FOLDS, cfg=cfg)
            competition = train_run.find_test_competition(INPUT)
            previous = kernel_run.find_previous(INPUT)  # its own earlier version's fold predictions, if attached
            out = kernel_run.run_kernel(model, competition, WORKING, previous=previous, scratch=SCRATCH)
        else:
            import yaml
            from ich_kaggle.core import config

            cfg = config.from_dict(yaml.safe_load(CONFIG_YAML), source="kernel.py CONFIG_YAML")
            inputs = train_run.find_train_inputs(INPUT, cfg.name, FOLD)
            log(f"competition {inputs.competition}, folds {inputs.prepared}, previous output {inputs.previous}")
            out = train_run.run_training(cfg, FOLD, inputs, WORKING, SCRATCH, epochs_per_run=EPOCHS_PER_RUN).dir
    except UserError as e:
        sys.exit(f"error: {e}")
    log(f"wrote {out} in {time.time() - started:.0f} s" if out else f"stopped after {time.time() - started:.0f} s")


def train_run_gpu_check(pairs):
    from ich_kaggle.kaggle import train_build

    return train_build.run_gpu_check(pairs, WORKING)


if __name__ == "__main__":
    main()

# Every target is a thin call of `python -m ich_kaggle ...`; the logic lives in the package.
# `make help` lists the targets (the `## ` after a target) and the variables (the `## VAR=` lines): keep both here.
PY        ?= .venv/bin/python
## CONFIG=<name>      config or ensemble: a name in ich_kaggle/configs/ (default seresnext50_512) or a YAML path
CONFIG    ?= seresnext50_512
## DATA_DIR=<folder>  competition folder in the Kaggle layout (default data/rsna-intracranial-hemorrhage-detection)
DATA_DIR  ?= data/rsna-intracranial-hemorrhage-detection
## RUNS=<folder>      where experiments are written (default runs)
## RUN=<name>         the experiment's folder RUNS/<name>/ (default: the config's name): a new RUN trains beside
RUNS      ?= runs
## fold=<k>           the fold of train, lr-find, kernel-train, kernel-fetch (default 0; FOLD= works too)
fold      ?= 0
FOLD      ?= $(fold)
## FORCE=1            train / stack: retrain a finished fold, recompute an up-to-date stack
FORCE     ?=
## K=<k> SEED=<s>     folds, kernel-prepare: number of folds and their seed (default 5 and 42)
K         ?=
SEED      ?=
## KAGGLE_USERNAME=<you>  Kaggle user name (default: $KAGGLE_USERNAME, else the one your token belongs to)
KAGGLE_USERNAME ?=
## MESSAGE="..."      version notes / submission message
MESSAGE   ?= ich_kaggle $(CONFIG)
## SLUG=<slug>        kernel slug (default ich-kaggle-<config>)
SLUG      ?= ich-kaggle-$(subst .,-,$(subst _,-,$(CONFIG)))
MODEL_DS  := ich-kaggle-model-$(subst .,-,$(subst _,-,$(CONFIG)))
## PYTEST_ARGS="..."  extra pytest arguments of `make test`, e.g. "-k demo -x"
PYTEST_ARGS ?=

# Messages of the package name the Make form of their advice (FORCE=1 rather than --force): core/errors.py.
export ICH_KAGGLE_MAKE := 1

# Make variables that override config keys: `make train EPOCHS=3 BATCH=16 LR=1e-4 SIZE=256`.
## EPOCHS= BATCH= LR= SIZE= WORKERS=  override train.epochs, train.batch_size, train.lr, data.image_size, data.num_workers
## SET_EXTRA="key=value ..."  override any other config key, e.g. SET_EXTRA="model.dropout=0.3 cv.k=3"
SET := $(if $(EPOCHS),train.epochs=$(EPOCHS)) $(if $(BATCH),train.batch_size=$(BATCH)) \
       $(if $(LR),train.lr=$(LR)) $(if $(SIZE),data.image_size=$(SIZE)) $(if $(WORKERS),data.num_workers=$(WORKERS)) $(SET_EXTRA)
# RUN=<name>: the experiment's folder runs/<name>/ (default: the config's name); a changed setting with a new RUN
# trains beside the old experiment
EXP  := --config "$(CONFIG)" --data "$(DATA_DIR)" --runs "$(RUNS)" $(if $(RUN),--run "$(RUN)") $(if $(strip $(SET)),--set $(SET))

.PHONY: help demo recipe test bench synth meta folds preprocess train train-all lr-find predict stack submit score \
        kernel kernel-datasets datasets-create datasets-version datasets-wait kernel-push kernel-wait \
        kernel-output kernel-submit kernel-score kernel-code kernel-prepare kernel-train kernel-fetch \
        kernel-fetch-prepare kernel-from-folds kernel-status gpu-check report compare clean-venv \
        install validate docs docs-check export infer evaluate serve \
        kernel-weights kaggle-plan kernel-gpu-check kernel-gpu-check-fetch kernel-combine kernel-finish test-fast lint

help: ## this list: the targets, then the variables (`make <target> VAR=value ...`)
	@echo "make <target> [VAR=value ...]   (python -m ich_kaggle --help: the same commands with their flags)"
	@echo "targets:"
	@awk -F ':[^#]*## ' '/^[a-z][a-z0-9_-]*:[^=#]*## / {printf "  %-18s %s\n", $$1, $$2}' $(firstword $(MAKEFILE_LIST))
	@echo "variables:"
	@sed -n 's/^## /  /p' $(firstword $(MAKEFILE_LIST))

# --- set-up: .venv is made from requirements.txt (the pinned lock) the first time any target needs it, and the
# package installed into it in editable mode (`import ich_kaggle` and the `ich-kaggle` command work from any folder) ---
$(PY): requirements.txt
	python3 -m venv .venv
	.venv/bin/pip install --quiet --upgrade pip
	.venv/bin/pip install --quiet -r requirements.txt
	.venv/bin/pip install --quiet --no-deps -e .
	@touch $(PY)

install: $(PY) ## create .venv from requirements.txt and install the package into it (every target does this first)

demo: $(PY) ## the whole pipeline on a synthetic competition, on CPU (~5 min); its figures are the README's
	$(PY) -m ich_kaggle demo $(if $(filter command line environment,$(origin DATA_DIR)),--data "$(DATA_DIR)") \
	    --config $(if $(filter command line,$(origin CONFIG)),$(CONFIG),demo) --runs "$(RUNS)" $(if $(RUN),--run "$(RUN)") \
	    $(if $(strip $(SET)),--set $(SET))

# the whole recipe, resumable (rerun after an interruption): ENSEMBLE=winners (default), seresnext_pair, kaggle_week
## ENSEMBLE=<name>    what `make recipe` trains (default winners: docs/stacking.md)
ENSEMBLE ?= winners
## GPUS=<n>           recipe: GPUs that train folds side by side (default -1: every visible one; 0: one at a time)
GPUS ?= -1
recipe: $(PY) ## the whole recipe on the real data, resumable: ENSEMBLE=, GPUS=, DATA_DIR=, RUN=
	$(PY) -m ich_kaggle recipe --config $(ENSEMBLE) --data "$(DATA_DIR)" --runs "$(RUNS)" --gpus $(GPUS) $(if $(RUN),--run "$(RUN)") $(if $(strip $(SET)),--set $(SET))

test: lint ## ruff, then the whole test suite on CPU (CI runs exactly this; ~10 min on 2 cores)
	$(PY) -m pytest -q tests $(PYTEST_ARGS)

test-fast: $(PY) ## the suite without the end-to-end tests marked slow (kernels, demo, install): for iterating
	$(PY) -m pytest -q tests -m "not slow" $(PYTEST_ARGS)

lint: $(PY) ## ruff: lint and format check of the package and the tests (`ruff format ich_kaggle tests` fixes format)
	$(PY) -m ruff check ich_kaggle tests
	$(PY) -m ruff format --check ich_kaggle tests

## MINI=<folder>      bench, gpu-check: the extracted real mini set (default: from ../shared when present)
bench: $(PY) ## speed and memory figures (docs/benchmarks.md); MINI= the real mini set
	$(PY) -m ich_kaggle bench $(if $(filter command line environment,$(origin MINI)),--mini $(MINI))

docs: $(PY) ## write the last `make demo` output into the README's demo block
	$(PY) -m ich_kaggle docs

docs-check: $(PY) ## check that the README's demo block is what the last `make demo` printed
	$(PY) -m ich_kaggle docs-check

# --- the pipeline, stage by stage ---
synth: $(PY) ## write the synthetic competition into DATA_DIR
	$(PY) -m ich_kaggle synth --out "$(DATA_DIR)"

meta: $(PY) ## scan the DICOM headers of DATA_DIR into meta.csv
	$(PY) -m ich_kaggle meta --data "$(DATA_DIR)"

folds: $(PY) ## patient-grouped folds (K=, SEED=)
	$(PY) -m ich_kaggle folds --data "$(DATA_DIR)" $(if $(K),--k $(K)) $(if $(SEED),--seed $(SEED))

preprocess: $(PY) ## DICOM -> cached HU images (resumable)
	$(PY) -m ich_kaggle preprocess --data "$(DATA_DIR)"

train: $(PY) ## train one fold (fold=, CONFIG=, FORCE=1 retrains a finished one)
	$(PY) -m ich_kaggle train $(EXP) --fold $(FOLD) $(if $(FORCE),--force)

train-all: $(PY) ## train every fold of CONFIG
	$(PY) -m ich_kaggle train $(EXP) --fold all $(if $(FORCE),--force)

lr-find: $(PY) ## plot loss against learning rate for one fold
	$(PY) -m ich_kaggle lr-find $(EXP) --fold $(FOLD)

## FINISH=1           predict: first finish folds whose training stopped early
predict: $(PY) ## TTA over every trained fold, test + out-of-fold (FINISH=1)
	$(PY) -m ich_kaggle predict $(EXP) $(if $(FINISH),--finish-training)

stack: $(PY) ## second-stage sequence model over each series (FORCE=1 recomputes)
	$(PY) -m ich_kaggle stack $(EXP) $(if $(FORCE),--force)

## KAGGLE_SUBMIT=1    submit: upload the file to the competition too (with MESSAGE=)
submit: $(PY) ## submissions/<config>.csv through the validator (KAGGLE_SUBMIT=1 uploads it)
	$(PY) -m ich_kaggle submit $(EXP)
	$(if $(KAGGLE_SUBMIT),$(PY) -m ich_kaggle kaggle-submit --file submissions/$(notdir $(basename $(CONFIG))).csv.gz \
	    --message "$(MESSAGE)")

## TRUTH=<csv> SUB=<csv>  score: labels in the stage_2_train.csv form, and the submission to score
score: $(PY) ## weighted log loss of a submission: TRUTH=<labels.csv> SUB=<submission.csv>
	$(if $(and $(TRUTH),$(SUB)),,$(error make score needs TRUTH=<labels csv> SUB=<submission csv>))
	$(PY) -m ich_kaggle score --truth "$(TRUTH)" --submission "$(SUB)"

## SAMPLE=<csv>       validate: the sample submission (with SUB=)
validate: $(PY) ## check a submission against the sample: SAMPLE=<sample.csv> SUB=<submission.csv>
	$(if $(and $(SAMPLE),$(SUB)),,$(error make validate needs SAMPLE=<sample submission csv> SUB=<submission csv>))
	$(PY) -m ich_kaggle validate --sample "$(SAMPLE)" --submission "$(SUB)"

## THRESHOLD=<p>      report: decision threshold of the confusion matrix, F1 and series table (default 0.5)
report: $(PY) ## plots and index.html of an experiment (CONFIG=)
	$(PY) -m ich_kaggle report $(EXP) $(if $(THRESHOLD),--threshold $(THRESHOLD))

## WIDE=1             compare: every column instead of the 120-column table
compare: $(PY) ## one table of every experiment with a score under RUNS, 120 columns (WIDE=1: every column)
	$(PY) -m ich_kaggle compare --runs "$(RUNS)" $(if $(WIDE),--wide)

# --- Kaggle: offline kernel and its two datasets ---
## FP16_WEIGHTS=1     kernel-datasets: ship the checkpoints in float16 (half the size)
kernel-datasets: $(PY) ## build the code and model dataset folders under kernels/
	$(PY) -m ich_kaggle kernel-datasets $(EXP) $(if $(KAGGLE_USERNAME),--username $(KAGGLE_USERNAME)) \
	    $(if $(FP16_WEIGHTS),--fp16-weights)

## MEMBERS="a b" FOLDS="0 1" ATTACH="slug ..." RESUME=1  kernel: a part kernel (its slug says which); adopt the
##                    attached kernels' fold predictions; attach its own previous output (a cut session resumes)
kernel: $(PY) ## write kernels/<slug>/, the offline inference kernel on the model bundle
	$(PY) -m ich_kaggle kernel $(EXP) $(if $(KAGGLE_USERNAME),--username $(KAGGLE_USERNAME)) \
	    $(if $(or $(MEMBERS),$(FOLDS)),$(if $(filter command line,$(origin SLUG)),--slug $(SLUG)),--slug $(SLUG)) \
	    $(if $(MEMBERS),--members $(MEMBERS)) $(if $(FOLDS),--folds $(FOLDS)) \
	    $(if $(ATTACH),--attach $(ATTACH)) $(if $(RESUME),--resume)

## OUTPUTS="dir-or-slug ..."  kernel-finish: the fetched outputs of the inference kernel's parts
kernel-finish: $(PY) ## the submission from the parts' fetched fold predictions, locally -> kernels/output/<slug>/
	$(PY) -m ich_kaggle kernel-finish $(EXP) $(if $(KAGGLE_USERNAME),--username $(KAGGLE_USERNAME)) --slug $(SLUG) \
	    --outputs $(OUTPUTS)

# Each step checks Kaggle's answer (the kaggle CLI exits 0 when the server refuses) and exits non-zero with it.
KAGGLE_ARGS = --config $(CONFIG) $(if $(KAGGLE_USERNAME),--username $(KAGGLE_USERNAME)) --slug $(SLUG)

datasets-create: kernel-datasets ## upload both datasets as new private Kaggle datasets
	$(PY) -m ich_kaggle datasets-create $(KAGGLE_ARGS)

datasets-version: kernel-datasets ## upload both datasets as new versions (MESSAGE=)
	$(PY) -m ich_kaggle datasets-version $(KAGGLE_ARGS) --message "$(MESSAGE)"

datasets-wait: $(PY) ## wait until Kaggle has processed both datasets
	$(PY) -m ich_kaggle datasets-wait $(KAGGLE_ARGS)

kernel-push: kernel ## push the kernel: Kaggle starts a run
	$(PY) -m ich_kaggle kernel-push $(KAGGLE_ARGS)

kernel-wait: $(PY) ## follow the kernel's run until it ends
	$(PY) -m ich_kaggle kernel-wait $(KAGGLE_ARGS)

kernel-output: $(PY) ## fetch the run's submission.csv and log
	$(PY) -m ich_kaggle kernel-output $(KAGGLE_ARGS)

kernel-submit: $(PY) ## submit the kernel's submission.csv (MESSAGE=)
	$(PY) -m ich_kaggle kaggle-submit $(KAGGLE_ARGS) --message "$(MESSAGE)"

# the whole last mile after `make datasets-create` (or datasets-version): wait, push, follow, fetch, submit
kernel-score: datasets-wait kernel-push kernel-wait kernel-output kernel-submit ## the five steps after datasets-create/-version in a row

# --- training on Kaggle's GPUs (no local GPU, nothing of the 450 GB downloaded): see the README ---
KUSER = $(if $(KAGGLE_USERNAME),--username $(KAGGLE_USERNAME))

kernel-code: $(PY) ## build and upload the code dataset (training on Kaggle)
	$(PY) -m ich_kaggle kernel-code $(KUSER)

kernel-weights: $(PY) ## build and upload the ImageNet weights dataset every training kernel attaches (CONFIG=)
	$(PY) -m ich_kaggle kernel-weights $(KUSER) $(if $(filter command line,$(origin CONFIG)),--config $(CONFIG))

kaggle-plan: $(PY) ## what CONFIG (config or ensemble) costs on T4 x2, per member and fold, and the weekly quota left
	$(PY) -m ich_kaggle kaggle-plan $(EXP) $(KUSER)

kernel-gpu-check: $(PY) ## push a short T4 x2 kernel measuring every shipped backbone and size's img/s
	$(PY) -m ich_kaggle kernel-gpu-check $(KUSER) --push

kernel-gpu-check-fetch: $(PY) ## its measured rates into kaggle_rates.yaml (commit it; kaggle-plan reads it)
	$(PY) -m ich_kaggle kernel-gpu-check-fetch $(KUSER)

kernel-prepare: $(PY) ## push the kernel that makes meta.csv + folds.csv on Kaggle (K=, SEED=)
	$(PY) -m ich_kaggle kernel-prepare $(KUSER) $(if $(K),--k $(K)) $(if $(SEED),--seed $(SEED)) --push

## RESUME=1 EPOCHS_PER_RUN=<n> T4_IMAGES_PER_S=<img/s>  kernel-train: resume, split the fold, measured T4 rate
# prints each kernel's line of the plan (an ensemble: one kernel per member) and refuses a fold that cannot end an
# epoch within the 12-hour session
kernel-train: $(PY) ## push the kernels that train one fold on Kaggle's T4 x2, one per member (fold=, RESUME=1)
	$(PY) -m ich_kaggle kernel-train $(EXP) --fold $(FOLD) $(KUSER) $(if $(RESUME),--resume) \
	    $(if $(EPOCHS_PER_RUN),--epochs-per-run $(EPOCHS_PER_RUN)) $(if $(T4_IMAGES_PER_S),--t4-images-per-s $(T4_IMAGES_PER_S)) --push

kernel-fetch: $(PY) ## download a training kernel's fold into RUNS/<config>/fold<N>/
	$(PY) -m ich_kaggle kernel-fetch --config $(CONFIG) --runs $(RUNS) --fold $(FOLD) $(KUSER)

# the inference kernel on the training kernels' outputs (kernel sources; no model dataset, first stage only)
## FOLDS="0 1 ..."    kernel-from-folds: which folds (default: every fold of the config); RESUME=1: attach its
##                    own previous output and adopt the fold predictions a cut session kept
kernel-from-folds: $(PY) ## push the inference kernel on the training kernels' outputs
	$(PY) -m ich_kaggle kernel-from-folds $(EXP) $(KUSER) $(if $(FOLDS),--folds $(FOLDS)) $(if $(RESUME),--resume) \
	    --push

kernel-combine: $(PY) ## an ensemble split into one from-folds kernel per member: fetch and combine their submissions
	$(PY) -m ich_kaggle kernel-combine $(EXP) $(KUSER)

kernel-fetch-prepare: $(PY) ## download the prepare kernel's meta.csv + folds.csv
	$(PY) -m ich_kaggle kernel-fetch-prepare --data $(DATA_DIR) $(KUSER)

kernel-status: $(PY) ## state on Kaggle of every kernel of the project
	$(PY) -m ich_kaggle kernel-status $(KUSER)

gpu-check: $(PY) ## a few minutes of real training + inference on the GPU(s) (MINI=)
	$(PY) -m ich_kaggle gpu-check $(if $(filter command line environment,$(origin MINI)),--mini $(MINI))

# use your model (docs/use-your-model.md): the bundle, then any DICOM folder / zip; MODEL defaults to bundles/<config>
## MODEL=<bundle>     export, infer, evaluate, serve: the model bundle folder (default bundles/<config>)
## OUT=<folder> INPUTS="<paths>" LABELS=<csv>  infer, evaluate: output folder, DICOM inputs, external labels
## DICOMWEB=<url> STUDY=<uid>  infer: pull the study from a PACS instead of INPUTS; FP16=1 export: float16 weights
## STAGE=<stage>      export: bundle this fresh stage (first_stage, stacked, stacked_embeddings, blend), not submit's
## HOST= PORT=          serve: where the page listens (default 127.0.0.1:8000)
MODEL     ?= bundles/$(notdir $(basename $(CONFIG)))
export: $(PY) ## the model bundle of CONFIG's finished folds into MODEL (FP16=1: float16 weights)
	$(PY) -m ich_kaggle export $(EXP) --out "$(MODEL)" $(if $(FP16),--fp16) $(if $(STAGE),--stage $(STAGE))

infer: $(PY) ## run MODEL on INPUTS (DICOM files, folders, zips) or DICOMWEB= STUDY=; writes OUT
	$(PY) -m ich_kaggle infer --model "$(MODEL)" --out "$(OUT)" $(INPUTS) \
	    $(if $(DICOMWEB),--dicomweb "$(DICOMWEB)" --study "$(STUDY)")

evaluate: $(PY) ## measure MODEL on INPUTS against LABELS (slice, series or study level; CQ500 reads.csv)
	$(PY) -m ich_kaggle evaluate --model "$(MODEL)" --labels "$(LABELS)" --out "$(OUT)" $(INPUTS)

# the model on a local web page: make serve [MODEL=<bundle>] [HOST=127.0.0.1] [PORT=8000]
serve: $(PY) ## the model on a local web page (MODEL= HOST= PORT=)
	$(PY) -m ich_kaggle serve --model "$(MODEL)" $(if $(HOST),--host $(HOST)) $(if $(PORT),--port $(PORT))

clean-venv: ## delete .venv (the next target recreates it)
	rm -rf .venv

# Every target is a thin call of `python -m ich_kaggle ...`; the logic lives in the package.
PY        ?= .venv/bin/python
CONFIG    ?= seresnext50_512
DATA_DIR  ?= data/rsna-intracranial-hemorrhage-detection
RUNS      ?= runs
fold      ?= 0
FOLD      ?= $(fold)
KAGGLE_USERNAME ?=
MESSAGE   ?= ich_kaggle $(CONFIG)
SLUG      ?= ich-kaggle-$(subst .,-,$(subst _,-,$(CONFIG)))
MODEL_DS  := ich-kaggle-model-$(subst .,-,$(subst _,-,$(CONFIG)))
PYTEST_ARGS ?=

# Make variables that override config keys: `make train EPOCHS=3 BATCH=16 LR=1e-4 SIZE=256`.
SET := $(if $(EPOCHS),train.epochs=$(EPOCHS)) $(if $(BATCH),train.batch_size=$(BATCH)) \
       $(if $(LR),train.lr=$(LR)) $(if $(SIZE),data.image_size=$(SIZE)) $(if $(WORKERS),data.num_workers=$(WORKERS)) $(SET_EXTRA)
# RUN=<name>: the experiment's folder runs/<name>/ (default: the config's name); a changed setting with a new RUN
# trains beside the old experiment
EXP  := --config "$(CONFIG)" --data "$(DATA_DIR)" --runs "$(RUNS)" $(if $(RUN),--run "$(RUN)") $(if $(strip $(SET)),--set $(SET))

.PHONY: help demo recipe test bench synth meta folds preprocess train train-all lr-find predict stack submit score \
        kernel kernel-datasets datasets-create datasets-version datasets-wait kernel-push kernel-wait \
        kernel-output kernel-submit kernel-score kernel-code kernel-prepare kernel-train kernel-fetch \
        kernel-fetch-prepare kernel-from-folds kernel-status gpu-check report compare clean-venv

help:
	@$(PY) -m ich_kaggle --help 2>/dev/null || echo "run 'make demo' first (it creates .venv)"

# --- set-up: .venv is made from requirements.txt the first time any target needs it ---
$(PY): requirements.txt
	python3 -m venv .venv
	.venv/bin/pip install --quiet --upgrade pip
	.venv/bin/pip install --quiet -r requirements.txt
	@touch $(PY)

demo: $(PY)
	$(PY) -m ich_kaggle demo $(if $(filter command line environment,$(origin DATA_DIR)),--data "$(DATA_DIR)") \
	    --config $(if $(filter command line,$(origin CONFIG)),$(CONFIG),demo) --runs "$(RUNS)" $(if $(RUN),--run "$(RUN)") \
	    $(if $(strip $(SET)),--set $(SET))

# the whole recipe, resumable (rerun after an interruption): ENSEMBLE=seresnext_pair or any config / ensemble
# GPUS: how many GPUs train folds side by side (default -1: every visible one)
ENSEMBLE ?= seresnext_pair
GPUS ?= -1
recipe: $(PY)
	$(PY) -m ich_kaggle recipe --config $(ENSEMBLE) --data "$(DATA_DIR)" --runs "$(RUNS)" --gpus $(GPUS) $(if $(RUN),--run "$(RUN)") $(if $(strip $(SET)),--set $(SET))

test: $(PY)
	$(PY) -m pytest -q tests $(PYTEST_ARGS)

bench: $(PY)
	$(PY) -m ich_kaggle bench

# --- the pipeline, stage by stage ---
synth: $(PY)
	$(PY) -m ich_kaggle synth --out "$(DATA_DIR)"

meta: $(PY)
	$(PY) -m ich_kaggle meta --data "$(DATA_DIR)"

folds: $(PY)
	$(PY) -m ich_kaggle folds --data "$(DATA_DIR)"

preprocess: $(PY)
	$(PY) -m ich_kaggle preprocess --data "$(DATA_DIR)"

train: $(PY)
	$(PY) -m ich_kaggle train $(EXP) --fold $(FOLD)

train-all: $(PY)
	$(PY) -m ich_kaggle train $(EXP) --fold all

lr-find: $(PY)
	$(PY) -m ich_kaggle lr-find $(EXP) --fold $(FOLD)

predict: $(PY)
	$(PY) -m ich_kaggle predict $(EXP) $(if $(FINISH),--finish-training)

stack: $(PY)
	$(PY) -m ich_kaggle stack $(EXP)

submit: $(PY)
	$(PY) -m ich_kaggle submit $(EXP)
	$(if $(KAGGLE_SUBMIT),$(PY) -m ich_kaggle kaggle-submit --file submissions/$(notdir $(basename $(CONFIG))).csv.gz \
	    --message "$(MESSAGE)")

report: $(PY)
	$(PY) -m ich_kaggle report $(EXP) $(if $(THRESHOLD),--threshold $(THRESHOLD))

compare: $(PY)
	$(PY) -m ich_kaggle compare --runs "$(RUNS)" $(if $(WIDE),--wide)

# --- Kaggle: offline kernel and its two datasets ---
kernel-datasets: $(PY)
	$(PY) -m ich_kaggle kernel-datasets $(EXP) $(if $(KAGGLE_USERNAME),--username $(KAGGLE_USERNAME)) \
	    $(if $(FP16_WEIGHTS),--fp16-weights)

kernel: $(PY)
	$(PY) -m ich_kaggle kernel $(EXP) $(if $(KAGGLE_USERNAME),--username $(KAGGLE_USERNAME)) --slug $(SLUG)

# Each step checks Kaggle's answer (the kaggle CLI exits 0 when the server refuses) and exits non-zero with it.
KAGGLE_ARGS = --config $(CONFIG) $(if $(KAGGLE_USERNAME),--username $(KAGGLE_USERNAME)) --slug $(SLUG)

datasets-create: kernel-datasets
	$(PY) -m ich_kaggle datasets-create $(KAGGLE_ARGS)

datasets-version: kernel-datasets
	$(PY) -m ich_kaggle datasets-version $(KAGGLE_ARGS) --message "$(MESSAGE)"

datasets-wait: $(PY)
	$(PY) -m ich_kaggle datasets-wait $(KAGGLE_ARGS)

kernel-push: kernel
	$(PY) -m ich_kaggle kernel-push $(KAGGLE_ARGS)

kernel-wait: $(PY)
	$(PY) -m ich_kaggle kernel-wait $(KAGGLE_ARGS)

kernel-output: $(PY)
	$(PY) -m ich_kaggle kernel-output $(KAGGLE_ARGS)

kernel-submit: $(PY)
	$(PY) -m ich_kaggle kaggle-submit $(KAGGLE_ARGS) --message "$(MESSAGE)"

# the whole last mile after `make datasets-create` (or datasets-version): wait, push, follow, fetch, submit
kernel-score: datasets-wait kernel-push kernel-wait kernel-output kernel-submit

# --- training on Kaggle's GPUs (no local GPU, nothing of the 450 GB downloaded): see the README ---
K    ?= 5
SEED ?= 42
KUSER = $(if $(KAGGLE_USERNAME),--username $(KAGGLE_USERNAME))

kernel-code: $(PY)
	$(PY) -m ich_kaggle kernel-code $(KUSER)

kernel-prepare: $(PY)
	$(PY) -m ich_kaggle kernel-prepare $(KUSER) --k $(K) --seed $(SEED) --push

# prints the estimated wall time on T4 x2 and refuses a fold that cannot end within the 12-hour session
kernel-train: $(PY)
	$(PY) -m ich_kaggle kernel-train $(EXP) --fold $(FOLD) $(KUSER) $(if $(RESUME),--resume) \
	    $(if $(EPOCHS_PER_RUN),--epochs-per-run $(EPOCHS_PER_RUN)) $(if $(T4_IMAGES_PER_S),--t4-images-per-s $(T4_IMAGES_PER_S)) --push

kernel-fetch: $(PY)
	$(PY) -m ich_kaggle kernel-fetch --config $(CONFIG) --runs $(RUNS) --fold $(FOLD) $(KUSER)

# the inference kernel on the training kernels' outputs (kernel sources; no model dataset, first stage only)
kernel-from-folds: $(PY)
	$(PY) -m ich_kaggle kernel-from-folds $(EXP) $(KUSER) $(if $(FOLDS),--folds $(FOLDS)) --push

kernel-fetch-prepare: $(PY)
	$(PY) -m ich_kaggle kernel-fetch-prepare --data $(DATA_DIR) $(KUSER)

kernel-status: $(PY)
	$(PY) -m ich_kaggle kernel-status $(KUSER)

gpu-check: $(PY)
	$(PY) -m ich_kaggle gpu-check $(if $(filter command line environment,$(origin MINI)),--mini $(MINI))

clean-venv:
	rm -rf .venv

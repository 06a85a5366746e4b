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
EXP  := --config $(CONFIG) --data $(DATA_DIR) --runs $(RUNS) $(if $(strip $(SET)),--set $(SET))

.PHONY: help demo recipe test bench synth meta folds preprocess train train-all lr-find predict stack submit score \
        kernel kernel-datasets datasets-create datasets-version kernel-push report compare clean-venv

help:
	@$(PY) -m ich_kaggle --help 2>/dev/null || echo "run 'make demo' first (it creates .venv)"

# --- set-up: .venv is made from requirements.txt the first time any target needs it ---
$(PY): requirements.txt
	python3 -m venv .venv
	.venv/bin/pip install --quiet --upgrade pip
	.venv/bin/pip install --quiet -r requirements.txt
	@touch $(PY)

demo: $(PY)
	$(PY) -m ich_kaggle demo $(if $(filter command line environment,$(origin DATA_DIR)),--data $(DATA_DIR)) \
	    --config $(if $(filter command line,$(origin CONFIG)),$(CONFIG),demo) $(if $(strip $(SET)),--set $(SET))

# the whole recipe, resumable (rerun after an interruption): ENSEMBLE=seresnext_pair or any config / ensemble
ENSEMBLE ?= seresnext_pair
recipe: $(PY)
	$(PY) -m ich_kaggle recipe --config $(ENSEMBLE) --data $(DATA_DIR) --runs $(RUNS) $(if $(strip $(SET)),--set $(SET))

test: $(PY)
	$(PY) -m pytest -q tests $(PYTEST_ARGS)

bench: $(PY)
	$(PY) -m ich_kaggle bench

# --- the pipeline, stage by stage ---
synth: $(PY)
	$(PY) -m ich_kaggle synth --out $(DATA_DIR)

meta: $(PY)
	$(PY) -m ich_kaggle meta --data $(DATA_DIR)

folds: $(PY)
	$(PY) -m ich_kaggle folds --data $(DATA_DIR)

preprocess: $(PY)
	$(PY) -m ich_kaggle preprocess --data $(DATA_DIR)

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
	$(PY) -m ich_kaggle submit $(EXP) $(if $(KAGGLE_SUBMIT),--kaggle-submit --message "$(MESSAGE)")

report: $(PY)
	$(PY) -m ich_kaggle report $(EXP) $(if $(THRESHOLD),--threshold $(THRESHOLD))

compare: $(PY)
	$(PY) -m ich_kaggle compare --runs $(RUNS)

# --- Kaggle: offline kernel and its two datasets ---
kernel-datasets: $(PY)
	$(PY) -m ich_kaggle kernel-datasets $(EXP) $(if $(KAGGLE_USERNAME),--username $(KAGGLE_USERNAME))

kernel: $(PY)
	$(PY) -m ich_kaggle kernel $(EXP) $(if $(KAGGLE_USERNAME),--username $(KAGGLE_USERNAME)) --slug $(SLUG)

datasets-create: kernel-datasets
	.venv/bin/kaggle datasets create -p kernels/ich-kaggle-code --dir-mode zip
	.venv/bin/kaggle datasets create -p kernels/$(MODEL_DS) --dir-mode zip

datasets-version: kernel-datasets
	.venv/bin/kaggle datasets version -p kernels/ich-kaggle-code --dir-mode zip -m "$(MESSAGE)"
	.venv/bin/kaggle datasets version -p kernels/$(MODEL_DS) --dir-mode zip -m "$(MESSAGE)"

kernel-push: kernel
	.venv/bin/kaggle kernels push -p kernels/$(SLUG)

clean-venv:
	rm -rf .venv

# make report : the notebook chain on real data (quick preset, PAD-UFES-20, 3 splits x 2 training seeds), sized for a CPU
# make test   : unit tests + nbval over the notebooks (smoke preset, synthetic data)
PYTHON   ?= python3.11
VENV     ?= .venv
PY       := $(VENV)/bin/python
DVLIB_DATA ?= ../shared/datasets
export DVLIB_DATA
TORCH_PINS := torch==2.14.1 torchvision==0.29.1
SEEDS    ?= 0 1 2
TRAIN_SEEDS ?= 0 1
PRESET   ?= quick
DATASET  ?= pad_ufes_20
RUN      ?= $(PRESET)-$(DATASET)

.PHONY: venv test report report-noniid report-seeds report-federated report-privacy report-across readme-results smoke notebooks lab bench clean

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH_PINS)
	$(PY) -m pip install -q -e ".[test,notebook,fl,privacy]"
	$(PY) -m ipykernel install --sys-prefix --name python3 >/dev/null
	touch $@

venv: $(VENV)/.installed

test: venv
	$(VENV)/bin/ruff check --quiet --select F,E9 dvlib tests tools benchmarks notebooks  # errors and unused names, notebooks too
	$(PY) -m pytest -q tests
	$(PY) -m pytest -q --nbval-lax --nbval-sanitize-with tests/nbval_sanitize.cfg -p no:randomly notebooks

report: venv
	$(VENV)/bin/dvlib run --preset $(PRESET) --dataset $(DATASET) --seeds $(SEEDS) --train-seeds $(TRAIN_SEEDS) --run $(RUN)

# the same chain with non-IID hospitals (Dirichlet label skew, alpha 0.5)
report-noniid: venv
	$(VENV)/bin/dvlib run --preset $(PRESET) --dataset $(DATASET) --seeds $(SEEDS) --train-seeds $(TRAIN_SEEDS) \
		--scheme dirichlet --alpha 0.5 --run $(RUN)-dirichlet0.5

# training noise on fixed splits (issue 18): split seed 0, training seeds 0-4, IID and Dirichlet hospitals on the
# same test patients (--test-design shared). Full Training trains on the same pooled images under either
# scheme, so only the IID run trains it; the restore epoch is run for the data vector only.
NOISE_RUN ?= seeds-$(DATASET)
NOISE_SEEDS ?= 0 1 2 3 4
report-seeds: venv
	$(VENV)/bin/dvlib run --preset $(PRESET) --dataset $(DATASET) --seeds 0 --train-seeds $(NOISE_SEEDS) \
		--test-design shared --run $(NOISE_RUN)-iid --finetune-methods data_vector
	$(VENV)/bin/dvlib run --preset $(PRESET) --dataset $(DATASET) --seeds 0 --train-seeds $(NOISE_SEEDS) \
		--test-design shared --scheme dirichlet --alpha 0.5 --run $(NOISE_RUN)-dirichlet0.5 --finetune-methods data_vector \
		--hospitals 1 2 3 4 --steps 01_split_data 02_finetune_hospitals 03_merge 04_restore_bn
	$(PY) tools/training_noise.py $(NOISE_RUN)-iid $(NOISE_RUN)-dirichlet0.5 --split-run $(RUN) --out reports/$(NOISE_RUN)

# notebook 08 (membership inference, DP-SGD hospitals) on the report's run, after `make report`, for every
# split seed and the first training seed: about 40 minutes on 2 cores with one epsilon
EPSILONS ?= 8

report-privacy: venv
	$(VENV)/bin/dvlib run --preset $(PRESET) --dataset $(DATASET) --seeds $(SEEDS) --train-seeds $(firstword $(TRAIN_SEEDS)) \
		--run $(RUN) --steps 08_privacy --epsilons $(EPSILONS)

# notebook 07 (Flower: the data vector against FedAvg and FedBN at R rounds) on the training-noise runs
# (issue 14): IID and Dirichlet hospitals on the same test patients, split seed 0, training seeds FL_SEEDS.
# Each R > 1 retrains every hospital: a replicate is about 16 minutes of the 2 cores at R = 1 2 8, 23 at
# FL_ROUNDS="1 2 4 8" (the committed report has 1 2 8). The two runs go side by side, one thread each.
FL_SEEDS ?= 0 1 2
FL_ROUNDS ?= 1 2 8
FL_RUN = $(VENV)/bin/dvlib run --preset $(PRESET) --dataset $(DATASET) --seeds 0 --train-seeds $(FL_SEEDS) \
		--test-design shared --steps 07_federated --fl-rounds $(FL_ROUNDS)
report-federated: report-seeds
	OMP_NUM_THREADS=1 $(FL_RUN) --run $(NOISE_RUN)-iid & iid=$$!; \
	OMP_NUM_THREADS=1 $(FL_RUN) --scheme dirichlet --alpha 0.5 --run $(NOISE_RUN)-dirichlet0.5; dir=$$?; \
	wait $$iid && test $$dir = 0
	$(PY) tools/federated_schemes.py $(NOISE_RUN)-iid $(NOISE_RUN)-dirichlet0.5 --out reports/federated-$(DATASET)

# the claims across datasets (issue 26), from the two committed reports' result files alone, after both
# `make report` and `make report DATASET=odir_fundus`
ACROSS_RUNS ?= reports/$(PRESET)-pad_ufes_20 reports/$(PRESET)-odir_fundus
report-across: venv
	$(PY) tools/claims_across.py $(ACROSS_RUNS) --out reports/across

# the README's results block, from the committed reports' files alone
readme-results: venv
	$(PY) tools/readme_results.py

smoke: venv
	$(VENV)/bin/dvlib run --preset smoke --run smoke

bench: venv
	$(PY) benchmarks/bench_train.py
	$(PY) benchmarks/bench_merge.py

# the notebooks are their own source: re-execute them in place (smoke preset, in order: each reads the files of
# the one before) to refresh the stored outputs nbval compares; progress goes to /dev/null so they stay clean
notebooks: venv
	DVLIB_PROGRESS_FILE=/dev/null $(PY) -m jupyter nbconvert --to notebook --execute --inplace --ExecutePreprocessor.kernel_name=python3 --ExecutePreprocessor.record_timing=False notebooks/0*.ipynb

# the notebooks in JupyterLab, with the data and the project's kernel (progress as widget bars); a relative
# DVLIB_DATA is read from the project root, wherever the kernel starts
lab: venv
	$(VENV)/bin/jupyter lab notebooks/

clean:
	rm -rf runs/smoke reports/smoke figures/smoke .pytest_cache

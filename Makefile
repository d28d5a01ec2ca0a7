# Quick start: `make demo` (set-up + demo data + 2-rank CPU training + eval), `make test`.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
SEED ?= 0
DEMO_STEPS ?= 800
DEMO_PORT ?= 29500
OBJECTIVE ?= brivl
# brivl keeps outputs/demo(-seedN); another objective trains into outputs/demo-OBJECTIVE(-seedN).
DEMO_OUT := outputs/demo$(if $(filter brivl,$(OBJECTIVE)),,-$(OBJECTIVE))$(if $(filter 0,$(SEED)),,-seed$(SEED))

.PHONY: setup demo demo-data test slurm chromium bench presets mlflow-server clean

setup: $(VENV)/.installed

$(VENV): $(VENV)/.installed

$(VENV)/.installed: requirements.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet -r requirements.txt
	touch $@

demo-data: setup
	$(PY) data_tools/make_demo_data.py --out data/demo

demo: demo-data
	DS_ACCELERATOR=cpu $(VENV)/bin/deepspeed --num_accelerators 2 --master_port $(DEMO_PORT) wenlan/train.py \
	  --deepspeed_config ds_configs/cpu_tiny.json --preset tiny --tokenizer data/demo/tokenizer \
	  --train-shards 'data/demo/train-{000000..000009}.tar' --val-shards data/demo/val-000000.tar \
	  --max-steps $(DEMO_STEPS) --eval-every 200 --save-every 200 --seed $(SEED) \
	  --no-color-augment --objective $(OBJECTIVE) --output-dir $(DEMO_OUT)
	@echo "eval: $(DEMO_OUT)/eval.json   dashboard: $(VENV)/bin/mlflow ui --backend-store-uri sqlite:///outputs/mlflow.db"

test: setup
	DS_ACCELERATOR=cpu $(PY) -m pytest -q tests

# Slurm's daemons and clients for tests/test_slurm.py (Debian/Ubuntu, as root; nothing if already there).
slurm:
	@command -v slurmctld >/dev/null && command -v slurmd >/dev/null && command -v sbatch >/dev/null || { \
	  apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends slurm-wlm; }

# Chromium for tests/test_dashboard.py (Playwright drives Debian's build: `playwright install` is not used) and
# a CJK font for the retrieval pictures' Chinese captions (Debian/Ubuntu, as root; nothing if already there).
chromium:
	@command -v chromium >/dev/null && test -e /usr/share/fonts/truetype/wqy/wqy-microhei.ttc || { \
	  apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends \
	  chromium fonts-wqy-microhei; }

bench: setup
	DS_ACCELERATOR=cpu $(PY) bench/engine_overhead.py
	DS_ACCELERATOR=cpu $(PY) bench/queue_manager.py
	DS_ACCELERATOR=cpu $(PY) bench/data_throughput.py
	DS_ACCELERATOR=cpu $(PY) bench/pipeline_bubble.py

# A tracking server for a team: `make mlflow-server`, then train with --mlflow-uri http://HOST:PORT. Bound to
# 127.0.0.1 unless MLFLOW_HOST says otherwise; SQLite suits one writer at a time (README: PostgreSQL).
MLFLOW_HOST ?= 127.0.0.1
MLFLOW_PORT ?= 5000
MLFLOW_STORE ?= sqlite:///outputs/mlflow-server.db
MLFLOW_ARTIFACTS ?= outputs/mlflow-artifacts
MLFLOW_ARGS ?=
mlflow-server: setup
	$(VENV)/bin/mlflow server --backend-store-uri $(MLFLOW_STORE) --artifacts-destination $(MLFLOW_ARTIFACTS) \
	  --host $(MLFLOW_HOST) --port $(MLFLOW_PORT) $(MLFLOW_ARGS)

presets: setup
	$(PY) -m wenlan.models.presets

clean:
	rm -rf outputs

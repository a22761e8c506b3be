# Every target bootstraps .venv on first use, so `make <anything>` works on a fresh machine.
PY      ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.installed
STORE   ?= data/store
INDEX   ?= $(STORE)/index.jsonl
RUN     ?= runs/latest
MODELS  ?= models
EPISODES ?= 240
HOSTS   ?= 6
SEED    ?= 7
PROFILE ?= quick
PORT    ?= 8080
SPEED   ?= 2

.PHONY: help venv data validate train export bench bench-fleet bench-scale demo test clean browser mosquitto lint

help:
	@echo "make demo      # venv, synthetic store, train, export, daemon + deck on http://localhost:$(PORT)"
	@echo "make test      # the whole test suite (what .ci/run runs)"
	@echo "make data validate train export bench   # the pipeline step by step"

$(STAMP): pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[dev]'
	touch $(STAMP)

venv: $(STAMP)

# Debian packages the tests drive for real, installed in one apt-get call when any is missing:
# Chromium for the deck (playwright never downloads a browser here), Mosquitto and its clients
# for the fleet (tests start a broker per test on a free 127.0.0.1 port).
TEST_DEBS = $(if $(shell command -v chromium),,chromium) \
	$(if $(wildcard /usr/sbin/mosquitto),,mosquitto) \
	$(if $(shell command -v mosquitto_passwd),,mosquitto-clients)
browser mosquitto:
	@missing="$(strip $(TEST_DEBS))"; [ -z "$$missing" ] || \
		(apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing)

$(STORE)/.done: $(STAMP)
	$(BIN)/phasewatch synth --out $(STORE) --episodes $(EPISODES) --hosts $(HOSTS) --seed $(SEED)
	touch $@

data: $(STORE)/.done

validate: data
	$(BIN)/phasewatch validate $(STORE) --index $(INDEX)

train: validate
	$(BIN)/phasewatch train --store $(STORE) --index $(INDEX) --out $(RUN) --profile $(PROFILE)

export: $(STAMP)
	$(BIN)/phasewatch export --run $(RUN) --out $(MODELS)

# The deck's model_perf points (models/bench.json, bench.png), then the reader, the extractor
# and the daemon benchmarks; each prints its figures measured side by side in one run.
bench: $(STAMP)
	$(BIN)/phasewatch bench --models $(MODELS) --store $(STORE)
	$(BIN)/python benchmarks/bench_reader.py --store $(STORE)
	$(BIN)/python benchmarks/bench_extract.py --store $(STORE)
	@mkdir -p out
	$(BIN)/python benchmarks/bench_daemon.py --models $(MODELS) --out out/bench-daemon.json

# The fleet: N simulated nodes (1, 10, 50) x 30 live episodes through one local Mosquitto into
# one --fleet daemon and a WebSocket client; and a node's inference p99 with the broker stopped.
bench-fleet: $(STAMP) mosquitto
	@mkdir -p out
	$(BIN)/python benchmarks/bench_fleet.py --models $(MODELS) --out out/bench-fleet.json

# The trainer at corpus scale (not part of make test; ~1 h on a busy 2-core box): synth 600 and 4,800
# episodes, validate, extract, train --profile demo, export; peak RSS per phase and its ratio.
bench-scale: $(STAMP)
	$(BIN)/python benchmarks/bench_scale.py --episodes 600,4800 --work out/bench-scale

demo: $(STAMP)
	$(MAKE) train export PROFILE=demo
	@echo "deck: http://localhost:$(PORT)  (replaying $(STORE) at $(SPEED)x; Ctrl-C stops)"
	$(BIN)/edge-daemon --models $(MODELS) --replay $(STORE) --store $(STORE) --port $(PORT) --speed $(SPEED)

test: $(STAMP) browser mosquitto lint
	$(BIN)/python -m pytest -q

clean:
	rm -rf $(VENV) data runs models .pytest_cache

# ruff (lint + format check) on everything, mypy on the Pi's side (schema/, edge/).
lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

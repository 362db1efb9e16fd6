# citrus-edge: the two set-up commands are `make demo` and `make test` (each installs first).
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
export PYTHONHASHSEED := 0

.PHONY: install test test-slow test-defaults mutation lint format demo demo-model data bench bench-scale load sweep report-check clean

$(BIN)/citrus-edge: pyproject.toml constraints.txt
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# torch first, alone, so pip takes the local CPU wheel and nothing pulls a CUDA build.
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -c constraints.txt -e '.[build,gpu,dev,serve]'
	touch $@

install: $(BIN)/citrus-edge

# Chromium (Debian's package) lets the sweep report's render test run; without root or apt the
# test skips and says so.
test: install
	@command -v chromium >/dev/null 2>&1 || (apt-get update -qq && apt-get install -y -qq chromium) >/dev/null 2>&1 || echo "make test: no Chromium (apt-get failed): the HTML render test will skip"
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/pytest -q

test-slow: install
	$(BIN)/pytest -q -m slow

# Mutants of the shared host code (postprocess, boxes, preprocess, decode) against the tests,
# on a temporary copy of the tree; exits 1 below 90 % killed on a file (minutes).
mutation: install
	$(BIN)/python scripts/mutation_check.py

# The slow tests that guard a path users get without flags (e.g. `make demo`'s no-flag build).
test-defaults: install
	$(BIN)/pytest -q -m "slow and default_path"

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: install
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

data: install
	$(BIN)/citrus-edge data phantoms --out data/phantoms

DEMO_OUT ?= out/demo
demo: install
	# The target's default: recipe int8 (each component kept int8 where this CPU runs it faster) under the default budget (dice=1,tokens=99).
	$(BIN)/citrus-edge build --target cpu --out $(DEMO_OUT)/bundle
	$(BIN)/citrus-edge data phantoms --n 10 --seed 7 --out $(DEMO_OUT)/phantoms --overwrite
	$(BIN)/citrus-edge run $(DEMO_OUT)/bundle $(DEMO_OUT)/phantoms/images/phantom_00000.dcm --out $(DEMO_OUT)/results
	$(BIN)/citrus-edge run $(DEMO_OUT)/bundle $$($(BIN)/python -c "from pydicom import examples; print(examples.get_path('palette_color'))") --out $(DEMO_OUT)/results
	@echo "demo results (JSON + overlays) in $(DEMO_OUT)/results; the overlays:"
	@ls -1 $(DEMO_OUT)/results/*.png

bench: install
	$(BIN)/python scripts/bench.py
	$(BIN)/python scripts/bench_phantoms.py --n 100 --set-n 500

# Not in `make test`: builds the 8B-width slice (1.45 B random parameters; minutes, ~10+ GB RAM)
# and prints seconds and peak RSS per stage. BENCH_SCALE_ARGS="--target cpu:int8" for more.
bench-scale: install
	$(BIN)/python scripts/bench_scale.py $(BENCH_SCALE_ARGS)

# Not in `make test`: 8 clients x 250 requests against `citrus-edge serve` on loopback (minutes);
# prints p50/p99, 503s, errors and server RSS per 100 requests; exit 1 on errors or RSS growth
# >= 5 %. LOAD_ARGS="--mode frames" loads the video-session API instead.
load: install
	test -d $(DEMO_OUT)/bundle || $(BIN)/citrus-edge build --target cpu --out $(DEMO_OUT)/bundle
	$(BIN)/citrus-edge data phantoms --n 10 --seed 7 --out $(DEMO_OUT)/phantoms --overwrite
	$(BIN)/python scripts/load_serve.py $(DEMO_OUT)/bundle --image $(DEMO_OUT)/phantoms/images/phantom_00000.dcm --json $(DEMO_OUT)/load.json $(LOAD_ARGS)

# Not in `make test`: the sweep report of the shipped models on the CPU (builds cached in
# out/sweep; resumable) and its HTML checked in headless Chromium (installed from Debian's
# packages when missing).
sweep: install
	$(BIN)/citrus-edge data phantoms --n 160 --seed 4242 --out out/sweep-data --overwrite
	$(BIN)/citrus-edge sweep --models demo,demo-lite --targets cpu,orin-nano-8 --recipes default,fp32,int8,int8-w4 --data out/sweep-data/manifest.jsonl --out out/sweep

report-check: install
	@command -v chromium >/dev/null 2>&1 || (apt-get update && apt-get install -y chromium)
	$(BIN)/python scripts/check_report_html.py out/sweep/report.html --screenshot out/sweep/report.png

# Resumable: re-run after an interruption. Ships the result as the package's demo model.
demo-model: install
	$(BIN)/python scripts/train_demo.py --out runs/demo
	rm -rf citrus_edge/demo_model && cp -r runs/demo/model citrus_edge/demo_model

clean:
	rm -rf build dist *.egg-info .pytest_cache .ruff_cache

# The commands a user runs; the README explains them. Everything installs into $(VENV).
VENV ?= .venv
PY := $(VENV)/bin/python
CHECKPOINT ?= ibm-granite/granite-speech-4.1-2b
NAR_CHECKPOINT ?= ibm-granite/granite-speech-4.1-2b-nar
VARIANTS ?= ar
AUDIO ?= samples/granite_speech_demo.wav
API_PORT ?= 8080
PYTEST_ARGS ?=
# export on the GPU that serves the modules (they hold device constants)
EXPORT_ARGS ?= --device cuda --dtype bfloat16
LOADTEST_VARIANT ?= ar
BENCH_VARIANTS ?= ar,nar
BENCH_ARGS ?=

.PHONY: setup setup-dev system-deps demo demo-tiny serve export-libtorch test lint bench bench-tiny loadtest clean

setup:  ## virtual environment with the pinned runtime dependencies and this project
	scripts/install.sh $(VENV)

setup-dev: system-deps  ## setup + test, lint and load-test tools
	INSTALL_DEV=1 scripts/install.sh $(VENV)

system-deps:  ## espeak-ng (tests synthesise speech) and docker-compose (checks docker/compose.yaml)
	@command -v espeak-ng >/dev/null && command -v docker-compose >/dev/null || \
		{ apt-get update -qq && apt-get install -y -qq espeak-ng docker-compose; }

demo: setup  ## the main job: serve CHECKPOINT and transcribe AUDIO through the ensemble
	$(PY) -m granite_speech_triton.cli demo --variants $(VARIANTS) --audio $(AUDIO) \
		--set ar_checkpoint=$(CHECKPOINT) --set nar_checkpoint=$(NAR_CHECKPOINT)

demo-tiny: setup  ## the main job on tiny random-weight checkpoints (meaningless text; smoke run)
	$(PY) -m granite_speech_triton.cli make-tiny-checkpoint build/tiny-ar
	$(PY) -m granite_speech_triton.cli make-tiny-checkpoint --nar build/tiny-nar
	$(MAKE) demo CHECKPOINT=build/tiny-ar NAR_CHECKPOINT=build/tiny-nar VARIANTS=ar,nar

serve: setup  ## tritonserver in the foreground on ports 8000/8001/8002, the OpenAI-compatible API on API_PORT beside it
	$(PY) -m granite_speech_api --set triton_url=127.0.0.1:8001 --set port=$(API_PORT) & api=$$!; \
	trap 'kill $$api 2>/dev/null' EXIT; \
	$(PY) -m granite_speech_triton.cli serve --variants $(VARIANTS) \
		--set ar_checkpoint=$(CHECKPOINT) --set nar_checkpoint=$(NAR_CHECKPOINT)

export-libtorch: setup  ## TorchScript encoder/projectors/NAR head for Triton's PyTorch backend (run on the serving GPU)
	$(PY) -m granite_speech_triton.cli export --checkpoint $(CHECKPOINT) --variant ar --out build/libtorch $(EXPORT_ARGS)
	$(PY) -m granite_speech_triton.cli export --checkpoint $(NAR_CHECKPOINT) --variant nar --out build/libtorch $(EXPORT_ARGS)

test: setup-dev  ## lint, then the whole test suite against real tritonserver processes
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(PY) -m pytest $(PYTEST_ARGS)

bench: setup-dev  ## transformers in-process vs Triton at 1/8/32 in flight -> build/bench/{results.json,rtfx.png}
	$(PY) -m granite_speech_triton.bench --variants $(BENCH_VARIANTS) \
		--ar-checkpoint $(CHECKPOINT) --nar-checkpoint $(NAR_CHECKPOINT) $(BENCH_ARGS)

bench-tiny: setup-dev  ## the benchmark on tiny random-weight checkpoints (CPU smoke run; the numbers mean little)
	$(PY) -m granite_speech_triton.bench --tiny --variants $(BENCH_VARIANTS) $(BENCH_ARGS)

loadtest: setup-dev  ## bounded headless Locust run against a server started with `make serve`
	$(PY) -m loadtest.run --server 127.0.0.1:8000 --users 4 --spawn-rate 4 --run-time 20s --variant $(LOADTEST_VARIANT)

lint: setup-dev
	$(VENV)/bin/ruff check . && $(VENV)/bin/ruff format --check .

clean:
	rm -rf build .pytest_cache

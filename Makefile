# The commands a user runs; the README explains them. Everything installs into $(VENV).
VENV ?= .venv
PY := $(VENV)/bin/python
CHECKPOINT ?= ibm-granite/granite-speech-4.1-2b
NAR_CHECKPOINT ?= ibm-granite/granite-speech-4.1-2b-nar
VARIANTS ?= ar
AUDIO ?= samples/granite_speech_demo.wav
# serve, demo, loadtest and bench: the server's ports (checked before any model loads)
HTTP_PORT ?= 8000
GRPC_PORT ?= 8001
METRICS_PORT ?= 8002
PORTS = --http-port $(HTTP_PORT) --grpc-port $(GRPC_PORT) --metrics-port $(METRICS_PORT)
DEMO_ARGS ?=
API_PORT ?= 8080
PYTEST_ARGS ?=
# export on the GPU that serves the modules (they hold device constants)
EXPORT_ARGS ?= --device cuda --dtype bfloat16
LOADTEST_VARIANT ?= ar
LOADTEST_ARGS ?=
SOAK_ARGS ?=
BENCH_VARIANTS ?= ar,nar
BENCH_ARGS ?=
BENCH_ENGINE_ARGS ?= --modes greedy,beam,cascade,speculative --planted

.PHONY: setup setup-dev system-deps demo demo-tiny serve export-libtorch test lint bench bench-tiny real-checkpoint bench-engine bench-step loadtest soak gpu-check clean

setup:  ## virtual environment with the pinned runtime dependencies and this project
	scripts/install.sh $(VENV)

setup-dev: system-deps  ## setup + test, lint and load-test tools
	INSTALL_DEV=1 scripts/install.sh $(VENV)

system-deps:  ## espeak-ng (the tests and the load test synthesise speech)
	@command -v espeak-ng >/dev/null || { apt-get update -qq && apt-get install -y -qq espeak-ng; }

demo: setup  ## the main job: serve CHECKPOINT and transcribe AUDIO through the ensemble
	$(PY) -m granite_speech_triton.cli demo --variants $(VARIANTS) --audio $(AUDIO) $(PORTS) \
		--set ar_checkpoint=$(CHECKPOINT) --set nar_checkpoint=$(NAR_CHECKPOINT) $(DEMO_ARGS)

demo-tiny: setup  ## the main job on tiny random-weight checkpoints (meaningless text; smoke run)
	$(PY) -m granite_speech_triton.cli make-tiny-checkpoint build/tiny-ar
	$(PY) -m granite_speech_triton.cli make-tiny-checkpoint --nar build/tiny-nar
	$(MAKE) demo CHECKPOINT=build/tiny-ar NAR_CHECKPOINT=build/tiny-nar VARIANTS=ar,nar DEMO_ARGS=--random-weights

serve: setup  ## tritonserver in the foreground on HTTP_PORT/GRPC_PORT/METRICS_PORT (8000/8001/8002), the OpenAI-compatible API on API_PORT (8080) beside it
	$(PY) -m granite_speech_api --set triton_url=127.0.0.1:$(GRPC_PORT) --set port=$(API_PORT) & api=$$!; \
	trap 'kill $$api 2>/dev/null' EXIT; \
	$(PY) -m granite_speech_triton.cli serve --variants $(VARIANTS) $(PORTS) \
		--set ar_checkpoint=$(CHECKPOINT) --set nar_checkpoint=$(NAR_CHECKPOINT)

export-libtorch: setup  ## TorchScript encoder/projectors/NAR head for Triton's PyTorch backend (run on the serving GPU)
	$(PY) -m granite_speech_triton.cli export --checkpoint $(CHECKPOINT) --variant ar --out build/libtorch $(EXPORT_ARGS)
	$(PY) -m granite_speech_triton.cli export --checkpoint $(NAR_CHECKPOINT) --variant nar --out build/libtorch $(EXPORT_ARGS)

test: setup-dev  ## lint, then the whole test suite against real tritonserver processes
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(PY) -m pytest $(PYTEST_ARGS)

bench: setup-dev  ## transformers in-process vs Triton at 1/8/32 in flight -> build/bench/{results.json,rtfx.png}
	$(PY) -m granite_speech_triton.cli bench --variants $(BENCH_VARIANTS) $(PORTS) \
		--ar-checkpoint $(CHECKPOINT) --nar-checkpoint $(NAR_CHECKPOINT) $(BENCH_ARGS)

bench-tiny: setup-dev  ## the benchmark on tiny random-weight checkpoints (CPU smoke run; the numbers mean little)
	$(PY) -m granite_speech_triton.cli bench --tiny --variants $(BENCH_VARIANTS) $(PORTS) $(BENCH_ARGS)

real-checkpoint: setup  ## random-weight AR checkpoint with the 2b's real dimensions in build/real-ar (~4.6 GB, ~1 min)
	$(PY) -m granite_speech_triton.cli make-checkpoint --size real build/real-ar

bench-engine: setup-dev  ## AR engine: in-process vs scheduler=static vs inflight, decoding modes -> build/bench-engine/engine_results.json
	$(PY) -m granite_speech_triton.bench_engine --ar-checkpoint $(CHECKPOINT) $(BENCH_ENGINE_ARGS)

bench-step: setup-dev  ## AR engine: a decode step's cost by rows, nn.Linear vs RowsLinear -> build/bench-step.json
	$(PY) -m granite_speech_triton.bench_step --ar-checkpoint $(CHECKPOINT) --out build/bench-step.json

loadtest: setup-dev  ## bounded headless Locust run against a server started with `make serve`; prints RTFx
	$(PY) -m loadtest.run --server 127.0.0.1:$(HTTP_PORT) --users 4 --spawn-rate 4 --run-time 20s \
		--variant $(LOADTEST_VARIANT) $(LOADTEST_ARGS)

soak: setup-dev  ## 10 min of AR+NAR load with bad requests, and the server's memory (on its machine; make serve VARIANTS=ar,nar)
	$(PY) -m loadtest.soak --server 127.0.0.1:$(HTTP_PORT) --duration 10m --warmup 2m --users 4 $(SOAK_ARGS)

# The GPU image brings its own torch: without this project's venv, the system python runs the check.
GPU_CHECK_PY ?= $(if $(wildcard $(PY)),$(PY),python3)
GPU_CHECK_ARGS ?=

gpu-check:  ## one GPU, no network: real-size checkpoints, both ensembles in cuda/bfloat16 vs in-process, RTFx at 1/32/128 -> build/gpu-check/results.json
	$(GPU_CHECK_PY) -m granite_speech_triton.gpu_check $(GPU_CHECK_ARGS)

lint: setup-dev
	$(VENV)/bin/ruff check . && $(VENV)/bin/ruff format --check .

clean:
	rm -rf build .pytest_cache

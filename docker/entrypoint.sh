#!/bin/sh
# Container entrypoint: render the Triton repositories from the GST_* settings, then become the
# launcher (`granite-speech-triton serve`), which runs /opt/tritonserver/bin/tritonserver as its
# child: it receives SIGTERM and drains the requests in flight before the server stops
# (GST_DRAIN_TIMEOUT_S, 30 s), restarts the server if one of its stages dies, and copies the
# server's log to stdout (`docker logs`).
#
#   GST_<SETTING>             every DeploySettings field (GST_DEVICE, GST_DTYPE, GST_MAX_BATCH_SIZE,
#                             GST_INSTANCE_COUNT, GST_AR_CHECKPOINT, GST_DRAIN_TIMEOUT_S, ...)
#   SERVE_VARIANTS=ar         ar, nar or ar,nar
#   REPOSITORY_DIR            where the filled repositories are written (writable; default under /tmp)
#   PYTHON_SHM_DEFAULT_BYTES  first shared-memory pool of each Python backend model instance
#   PYTHON_SHM_GROWTH_BYTES   step by which a pool grows when a batch does not fit
# Arguments are passed on to `serve`, e.g. `--set max_queue_delay_us=5000`.
#
# The launcher loads every model at start (explicit model control) and restricts Triton's
# model-repository API (load, unload) to a key it makes at each start: clients cannot load or
# unload models.
set -eu

: "${SERVE_VARIANTS:=ar}"
: "${REPOSITORY_DIR:=/tmp/granite-speech-triton/repository}"
: "${PYTHON_SHM_DEFAULT_BYTES:=67108864}"
: "${PYTHON_SHM_GROWTH_BYTES:=67108864}"

exec granite-speech-triton serve --log-to-stdout \
    --tritonserver /opt/tritonserver/bin/tritonserver \
    --backend-directory /opt/tritonserver/backends \
    --out "$REPOSITORY_DIR" \
    --variants "$SERVE_VARIANTS" \
    --address 0.0.0.0 \
    --http-port 8000 \
    --grpc-port 8001 \
    --metrics-port 8002 \
    --backend-config "python,shm-default-byte-size=$PYTHON_SHM_DEFAULT_BYTES" \
    --backend-config "python,shm-growth-byte-size=$PYTHON_SHM_GROWTH_BYTES" \
    "$@"

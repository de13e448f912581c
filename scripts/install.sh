#!/usr/bin/env bash
# The one install recipe (CI, README, docker/Dockerfile):
#
#   scripts/install.sh [VENV_DIR]          # default VENV_DIR: .venv in the project root
#
# Creates (or reuses) a virtual environment, installs the pinned requirements.txt, then the
# project itself in editable mode (its templates are read from the source tree), ./client and ./api.
# A second run with unchanged inputs returns at once: a stamp in the venv holds the hash of the
# requirement files and of the settings below; FORCE=1 reinstalls anyway.
#
# Settings (environment variables):
#   PYTHON=python3        interpreter the venv is made from (the GPU image: /usr/bin/python3,
#                         the Python that Triton's Python backend stub was built for)
#   INSTALL_DEV=0         1: also requirements-dev.txt and loadtest/requirements.txt
#   TORCH_SPEC=           torch requirement; default: the torch line of requirements.txt
#   TORCH_INDEX_URL=      index torch is installed from (e.g. https://download.pytorch.org/whl/cu130);
#                         default: the configured index (PyPI's Linux x86_64 torch wheel is a CUDA build)
#   WITH_PYTRITON=1       0: skip nvidia-pytriton (its bundled tritonserver is for tests; the NGC
#                         image has /opt/tritonserver)
#   INSTALL_PROJECT=1     0: third-party requirements only (a cacheable Docker layer before the source)
#   FORCE=0               1: ignore the stamp
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${1:-$ROOT/.venv}"
PYTHON="${PYTHON:-python3}"
INSTALL_DEV="${INSTALL_DEV:-0}"
WITH_PYTRITON="${WITH_PYTRITON:-1}"
INSTALL_PROJECT="${INSTALL_PROJECT:-1}"
TORCH_INDEX_URL="${TORCH_INDEX_URL:-}"
FORCE="${FORCE:-0}"
# A requirement line names torch (or nvidia-pytriton) when the name is followed by a version
# operator, an extra, a marker, a space or the end of the line.
TORCH_LINE='^torch([<>=!~ ;[]|$)'
PYTRITON_LINE='^nvidia-pytriton([<>=!~ ;[]|$)'

log() { printf 'install.sh: %s\n' "$*" >&2; }

default_torch_spec() {
    local line
    line="$(grep -E "$TORCH_LINE" "$ROOT/requirements.txt" | head -n 1 || true)"
    [[ -n "$line" ]] || { log "requirements.txt has no torch line; set TORCH_SPEC"; exit 1; }
    printf '%s' "${line%% #*}"
}
TORCH_SPEC="${TORCH_SPEC:-$(default_torch_spec)}"

# The files whose content decides what gets installed, for the stamp.
inputs() {
    echo "$ROOT/requirements.txt"
    if [[ "$INSTALL_PROJECT" == 1 ]]; then
        echo "$ROOT/pyproject.toml"
        [[ -f "$ROOT/client/pyproject.toml" ]] && echo "$ROOT/client/pyproject.toml"
        [[ -f "$ROOT/api/pyproject.toml" ]] && echo "$ROOT/api/pyproject.toml"
    fi
    if [[ "$INSTALL_DEV" == 1 ]]; then
        echo "$ROOT/requirements-dev.txt"
        [[ -f "$ROOT/loadtest/requirements.txt" ]] && echo "$ROOT/loadtest/requirements.txt"
    fi
    return 0
}

fingerprint() {
    {
        printf 'python=%s dev=%s project=%s pytriton=%s torch=%s index=%s\n' \
            "$("$VENV/bin/python" -c 'import sys; print(sys.version.split()[0])')" \
            "$INSTALL_DEV" "$INSTALL_PROJECT" "$WITH_PYTRITON" "$TORCH_SPEC" "$TORCH_INDEX_URL"
        while read -r file; do
            printf '%s\n' "${file#"$ROOT"/}"
            cat "$file"
        done < <(inputs)
    } | sha256sum | cut -d' ' -f1
}

if [[ ! -x "$VENV/bin/python" ]]; then
    log "creating $VENV with $PYTHON"
    "$PYTHON" -m venv "$VENV" || {
        log "'$PYTHON -m venv' failed (on Debian/Ubuntu: apt-get install python3-venv)"
        exit 1
    }
fi

STAMP="$VENV/.granite-speech-triton-install"
want="$(fingerprint)"
if [[ "$FORCE" != 1 && -f "$STAMP" && "$(cat "$STAMP")" == "$want" ]]; then
    log "$VENV is up to date"
    exit 0
fi
rm -f "$STAMP"

pip_install() { "$VENV/bin/python" -m pip install --disable-pip-version-check "$@"; }

log "torch: $TORCH_SPEC${TORCH_INDEX_URL:+ from $TORCH_INDEX_URL}"
if [[ -n "$TORCH_INDEX_URL" ]]; then
    pip_install --index-url "$TORCH_INDEX_URL" "$TORCH_SPEC"
else
    pip_install "$TORCH_SPEC"
fi

# requirements.txt without the lines installed (or skipped) above.
filtered="$(mktemp)"
trap 'rm -f "$filtered"' EXIT
grep -vE "$TORCH_LINE" "$ROOT/requirements.txt" \
    | if [[ "$WITH_PYTRITON" == 1 ]]; then cat; else grep -vE "$PYTRITON_LINE"; fi >"$filtered" || true
requirements=(-r "$filtered")
if [[ "$INSTALL_DEV" == 1 ]]; then
    requirements+=(-r "$ROOT/requirements-dev.txt")
    [[ -f "$ROOT/loadtest/requirements.txt" ]] && requirements+=(-r "$ROOT/loadtest/requirements.txt")
fi
log "requirements.txt (torch above$([[ "$WITH_PYTRITON" == 1 ]] || echo ', no nvidia-pytriton'))$(
    [[ "$INSTALL_DEV" == 1 ]] && echo ' + dev')"
pip_install "${requirements[@]}"

if [[ "$INSTALL_PROJECT" == 1 ]]; then
    log "project: $ROOT (editable)"
    pip_install -e "$ROOT"
    if [[ -f "$ROOT/client/pyproject.toml" ]]; then
        log "client: $ROOT/client (editable)"
        pip_install -e "$ROOT/client"
    fi
    if [[ -f "$ROOT/api/pyproject.toml" ]]; then
        log "api: $ROOT/api (editable)"
        pip_install -e "$ROOT/api"
    fi
fi

echo "$want" >"$STAMP"
log "done: $VENV"

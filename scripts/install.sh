#!/usr/bin/env bash
# The one install recipe (CI, README, docker/Dockerfile):
#
#   scripts/install.sh [VENV_DIR]          # default VENV_DIR: .venv in the project root
#
# Creates (or reuses) a virtual environment, installs the pinned requirements.txt, then the
# project itself in editable mode (its templates are read from the source tree), ./client and ./api.
# A second run with unchanged inputs returns at once: a stamp in the venv holds the hash of the
# requirement files and of the settings below; FORCE=1 reinstalls anyway. A dev install
# (INSTALL_DEV=1) holds all of a plain one, so it satisfies a later plain run as it is
# (`make setup` after `make setup-dev` installs nothing). pip's output is shown without its
# "Requirement already satisfied" lines: it says something only when it installs something.
#
# Settings (environment variables):
#   PYTHON=python3        interpreter the venv is made from (the GPU image: /usr/bin/python3,
#                         the Python that Triton's Python backend stub was built for)
#   INSTALL_DEV=0         1: also requirements-dev.txt and loadtest/requirements.txt
#   TORCH_SPEC=           torch requirement; default: the torch line of requirements.txt
#   TORCH_INDEX_URL=      index torch is installed from; default: pip's configured index. PyPI's
#                         Linux x86_64 torch wheel is a CUDA build (several GB with its nvidia-*
#                         wheels); on a machine without a GPU take the CPU build instead:
#                         TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu (2.13.0+cpu, which
#                         satisfies torch==2.13.0). A CUDA build of your choice: .../whl/cu130.
#                         Where pip is offered both, e.g. 2.13.0+cpu in a local wheel folder
#                         (find-links) beside PyPI's 2.13.0, it takes +cpu: a local version label
#                         sorts after the plain release.
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

# The files whose content decides what gets installed, for the stamp. $1: INSTALL_DEV (0 or 1).
inputs() {
    echo "$ROOT/requirements.txt"
    if [[ "$INSTALL_PROJECT" == 1 ]]; then
        echo "$ROOT/pyproject.toml"
        [[ -f "$ROOT/client/pyproject.toml" ]] && echo "$ROOT/client/pyproject.toml"
        [[ -f "$ROOT/api/pyproject.toml" ]] && echo "$ROOT/api/pyproject.toml"
    fi
    if [[ "$1" == 1 ]]; then
        echo "$ROOT/requirements-dev.txt"
        [[ -f "$ROOT/loadtest/requirements.txt" ]] && echo "$ROOT/loadtest/requirements.txt"
    fi
    return 0
}

# The stamp of an install with the current inputs and settings. $1: INSTALL_DEV (0 or 1).
fingerprint() {
    {
        printf 'python=%s dev=%s project=%s pytriton=%s torch=%s index=%s\n' \
            "$("$VENV/bin/python" -c 'import sys; print(sys.version.split()[0])')" \
            "$1" "$INSTALL_PROJECT" "$WITH_PYTRITON" "$TORCH_SPEC" "$TORCH_INDEX_URL"
        while read -r file; do
            printf '%s\n' "${file#"$ROOT"/}"
            cat "$file"
        done < <(inputs "$1")
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
want="$(fingerprint "$INSTALL_DEV")"
if [[ "$FORCE" != 1 && -f "$STAMP" ]]; then
    have="$(cat "$STAMP")"
    if [[ "$have" == "$want" || ("$INSTALL_DEV" == 0 && "$have" == "$(fingerprint 1)") ]]; then
        log "$VENV is up to date"
        exit 0
    fi
fi
rm -f "$STAMP"

# pip install, its output less what only says that nothing needs installing.
pip_install() {
    "$VENV/bin/python" -m pip install --disable-pip-version-check "$@" 2>&1 |
        { grep --line-buffered -v -E '^(Requirement already satisfied|Looking in (indexes|links)):' || true; }
}

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

# Editable installs rebuild every time; their build steps tell nothing (errors still show).
if [[ "$INSTALL_PROJECT" == 1 ]]; then
    log "project: $ROOT (editable)"
    pip_install --quiet -e "$ROOT"
    if [[ -f "$ROOT/client/pyproject.toml" ]]; then
        log "client: $ROOT/client (editable)"
        pip_install --quiet -e "$ROOT/client"
    fi
    if [[ -f "$ROOT/api/pyproject.toml" ]]; then
        log "api: $ROOT/api (editable)"
        pip_install -e "$ROOT/api"
    fi
fi

echo "$want" >"$STAMP"
log "done: $VENV"

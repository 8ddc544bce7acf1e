#!/usr/bin/env bash
# One-stop set-up + run for a fresh machine.
#   bash run.sh demo [args]   -> the main job: end-to-end encrypted fine-tuning demo (BreastMNIST)
#   bash run.sh test [args]   -> the test suite (fast tests; add -m slow for production-parameter tests)
# It finds CPython 3.10 (OpenFHE's PyPI wheel only imports there), makes .venv, installs the
# project, then runs the command. Re-running reuses the venv.
set -euo pipefail
cd "$(dirname "$0")"

find_python310() {
  for cand in "${PYTHON310:-}" python3.10 "$(command -v pyenv >/dev/null 2>&1 && echo "$(pyenv root)/versions/3.10.13/bin/python3.10")"; do
    [ -n "$cand" ] || continue
    if command -v "$cand" >/dev/null 2>&1 && "$cand" -c 'import sys; assert sys.version_info[:2] == (3, 10)' 2>/dev/null; then
      command -v "$cand"; return 0
    fi
  done
  for cand in "$HOME"/.pyenv/versions/3.10*/bin/python3.10 /root/.pyenv/versions/3.10*/bin/python3.10; do
    [ -x "$cand" ] && { echo "$cand"; return 0; }
  done
  echo "error: CPython 3.10 not found (OpenFHE's wheel needs it). Install python3.10 or set PYTHON310=/path/to/python3.10" >&2
  return 1
}

setup() {
  if [ ! -x .venv/bin/python ] || ! .venv/bin/python -c 'import medblindtuner, openfhe, torch, timm' 2>/dev/null; then
    py=$(find_python310)
    echo "[setup] creating .venv with $py" >&2
    "$py" -m venv .venv
    .venv/bin/python -m pip install --quiet --upgrade pip
    .venv/bin/python -m pip install --quiet -e ".[dev]"
  fi
}

cmd=${1:-}
shift || true
case "$cmd" in
  demo) setup; exec .venv/bin/medblindtuner demo "$@" ;;
  test) setup; exec .venv/bin/python -m pytest -m "not slow" -q "$@" ;;
  *) echo "usage: bash run.sh {demo|test} [args]" >&2; exit 2 ;;
esac

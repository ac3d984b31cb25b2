#!/usr/bin/env bash
# One entry point that sets itself up: `bash run.sh demo` runs the end-to-end demo,
# `bash run.sh test` runs lint, type checks and the whole test suite. Anything after the
# command is passed on (e.g. `bash run.sh test -k header`, `bash run.sh demo --params 1B`).
#
# Set-up: a virtual environment in .venv (reused; reinstalled when pyproject.toml changes).
# torch is installed as the CPU build 2.13.0 *before* the project when it is missing, so the
# project's own range (torch>=2.2, tests only) never pulls a CUDA build.
set -euo pipefail
cd "$(dirname "$0")"
cmd="${1:-}"
shift || true
case "$cmd" in
  demo|test) ;;
  *) echo "usage: bash run.sh demo|test [args...]" >&2; exit 2 ;;
esac

python=${PYTHON:-python3}
venv=.venv
if [ ! -x "$venv/bin/python" ]; then
  "$python" -m venv "$venv"
fi
py="$venv/bin/python"
pip() { "$py" -m pip --disable-pip-version-check -q "$@"; }

extra=""
[ "$cmd" = test ] && extra="[test]"
stamp="$venv/.installed$extra-$(cksum pyproject.toml | cut -d' ' -f1)"
if [ ! -f "$stamp" ]; then
  if [ "$cmd" = test ] && ! "$py" -c "import torch" 2>/dev/null; then
    pip install "torch==2.13.0"
  fi
  pip install -e ".$extra"
  touch "$stamp"
fi

if [ "$cmd" = demo ]; then
  exec "$venv/bin/streamvec" demo "$@"
fi

"$venv/bin/ruff" check .
"$venv/bin/ruff" format --check .
"$venv/bin/mypy" streamvec
exec "$py" -m pytest -q "$@"

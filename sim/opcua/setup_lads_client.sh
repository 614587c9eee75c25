#!/usr/bin/env bash
# A Python >= 3.12 venv with the PyPI lads-opcua-client, for the LADS interop test
# (tests/sim/opcua/test_opcua_lads_client.py), in a git-ignored folder (default
# build/lads-venv, override with HMPC_LADS_VENV). Safe to re-run.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
VENV="${HMPC_LADS_VENV:-$ROOT/build/lads-venv}"
VERSION="${LADS_CLIENT_VERSION:-0.1.0}"
if [ -x "$VENV/bin/python" ] && "$VENV/bin/python" -c "import lads_opcua_client" 2>/dev/null; then
  echo "lads-opcua-client already installed in $VENV"
  exit 0
fi
PY=""
for candidate in python3.13 python3.12 "${PYENV_ROOT:-$HOME/.pyenv}"/versions/3.1[23]*/bin/python; do
  if command -v "$candidate" >/dev/null 2>&1 \
     && "$candidate" -c 'import sys; sys.exit(sys.version_info < (3, 12))' 2>/dev/null; then
    PY="$candidate"
    break
  fi
done
if [ -z "$PY" ]; then
  echo "setup_lads_client.sh: no Python >= 3.12 found; the LADS client test will be skipped" >&2
  exit 0
fi
"$PY" -m venv "$VENV"
"$VENV/bin/pip" install --quiet "lads-opcua-client==$VERSION"
echo "lads-opcua-client $VERSION installed in $VENV ($("$VENV/bin/python" --version))"

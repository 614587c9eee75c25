#!/usr/bin/env bash
# System packages of the integration tests, from Debian's archive (called by `make setup`):
#   postgresql          a real PostgreSQL server; tests/controller start a throwaway cluster
#                       (initdb + pg_ctl on a free loopback port in a temporary folder)
#   chromium            the headless browser that renders the batch report in
#                       tests/controller/records/test_report.py (driven by playwright from PyPI,
#                       which is given this executable: no browser download)
# Safe to re-run: a no-op when both are installed. As root it installs with apt-get; as
# another user it uses `sudo -n` when allowed, else says what to run and exits 0 (the
# tests that need the packages then fail with the same advice).
set -euo pipefail

have_postgres() { compgen -G "/usr/lib/postgresql/*/bin/initdb" >/dev/null || command -v initdb >/dev/null; }
have_chromium() { command -v chromium >/dev/null || command -v chromium-browser >/dev/null; }

if have_postgres && have_chromium; then
  echo "test services: postgresql and chromium already installed"
  exit 0
fi
packages=(postgresql chromium)
if [ "$(id -u)" -eq 0 ]; then
  SUDO=()
elif command -v sudo >/dev/null && sudo -n true 2>/dev/null; then
  SUDO=(sudo -n)
else
  echo "setup_test_services.sh: not root; install the test packages with:" >&2
  echo "  sudo apt-get update && sudo apt-get install -y ${packages[*]}" >&2
  exit 0
fi
export DEBIAN_FRONTEND=noninteractive
"${SUDO[@]}" apt-get update -q
"${SUDO[@]}" apt-get install -y -q "${packages[@]}"
# Debian's package starts a cluster of its own on port 5432; the tests never use it.
have_postgres && have_chromium
echo "test services: installed ${packages[*]}"

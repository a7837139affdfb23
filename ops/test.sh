#!/usr/bin/env bash
# Run every test of the workspace against the real services.
# Installs what the tests need and starts the services first.
set -euo pipefail
cd "$(dirname "$0")/.."
bash ops/install-deps.sh
bash ops/ensure-services.sh
cargo test --workspace "$@"

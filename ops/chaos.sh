#!/usr/bin/env bash
# The chaos benchmark (docs/reliability.md, "Chaos run"): build sieve,
# sieve-worker and sieve-tools, make sure the services answer, then run
# `sieve-tools bench chaos` with the options given (default: 10,000 items,
# 3 workers). It restarts RabbitMQ and PostgreSQL, which every user of this
# machine shares: it waits for running test binaries first, but run it when
# nothing else needs the services.
#
#   ops/chaos.sh [--items 2000] [--workers 3] [--keep] ...
#   PROFILE=debug ops/chaos.sh ...     # a debug build (quicker to build)
#   SIEVE_BIN_DIR=DIR ops/chaos.sh ... # binaries already built, in DIR
set -euo pipefail
cd "$(dirname "$0")/.."

bash ops/ensure-services.sh
if [ -n "${SIEVE_BIN_DIR:-}" ]; then
    bin="$SIEVE_BIN_DIR"
else
    profile="${PROFILE:-release}"
    flag=()
    [ "$profile" = release ] && flag=(--release)
    cargo build "${flag[@]}" -p sieve-scheduler -p sieve-worker -p sieve-tools
    bin="${CARGO_TARGET_DIR:-target}/$profile"
fi
for b in sieve sieve-worker sieve-tools; do
    [ -x "$bin/$b" ] || { echo "no $bin/$b: build it or fix SIEVE_BIN_DIR" >&2; exit 1; }
done
exec "$bin/sieve-tools" bench chaos --bin-dir "$bin" "$@"

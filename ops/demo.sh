#!/usr/bin/env bash
# The main job: run sieve's active-learning loop on Fashion-MNIST with
# simulated reviewers. Installs what it needs, starts the services, builds,
# migrates, starts a scheduler and N workers, runs `sieve-tools demo`, stops them.
#
#   ops/demo.sh [--workers N] [sieve-tools demo options, e.g. --images 300]
#   SIEVE_BIN_DIR=target/release ops/demo.sh    # binaries already built
#
# It builds release binaries, as the container images ship them: the loop
# trains a model every round, and a debug build takes about twice as long.
set -euo pipefail
cd "$(dirname "$0")/.."

workers=2
args=()
while [ $# -gt 0 ]; do
    case "$1" in
        --workers) workers="$2"; shift 2 ;;
        *) args+=("$1"); shift ;;
    esac
done

bash ops/install-deps.sh
bash ops/ensure-services.sh
# SIEVE_BIN_DIR: run binaries built elsewhere (a release build, say) as they are.
if [ -n "${SIEVE_BIN_DIR:-}" ]; then
    bin="$SIEVE_BIN_DIR"
else
    cargo build --release --bins
    bin="${CARGO_TARGET_DIR:-target}/release"
fi
for b in sieve sieve-worker sieve-tools; do
    [ -x "$bin/$b" ] || { echo "no $bin/$b: build it (cargo build --release --bins) or fix SIEVE_BIN_DIR" >&2; exit 1; }
done

# A demo of its own: database, queue prefix, store and port.
export SIEVE_DATABASE__URL="${SIEVE_DATABASE__URL:-postgres://postgres@127.0.0.1:5432/sieve_demo}"
export SIEVE_BROKER__PREFIX="${SIEVE_BROKER__PREFIX:-sieve-demo}"
export SIEVE_REDIS__PREFIX="${SIEVE_REDIS__PREFIX:-sieve-demo}"
export SIEVE_STORE__ROOT="${SIEVE_STORE__ROOT:-$PWD/sieve-demo/store}"
export SIEVE_HTTP__BIND="${SIEVE_HTTP__BIND:-127.0.0.1:8088}"
export SIEVE_HTTP__API_URL="${SIEVE_HTTP__API_URL:-http://$SIEVE_HTTP__BIND}"
export SIEVE_HTTP__WORKER_BIND=127.0.0.1:0
mkdir -p sieve-demo/logs

"$bin/sieve" migrate
pids=()
cleanup() {
    for pid in "${pids[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
    wait 2>/dev/null || true
}
trap cleanup EXIT INT TERM
"$bin/sieve" serve >sieve-demo/logs/scheduler.log 2>&1 &
pids+=($!)
for ((i = 1; i <= workers; i++)); do
    "$bin/sieve-worker" >"sieve-demo/logs/worker-$i.log" 2>&1 &
    pids+=($!)
done
"$bin/sieve-tools" demo --work-dir sieve-demo "${args[@]}"

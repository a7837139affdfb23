#!/usr/bin/env bash
# A three-node RabbitMQ 3.10 cluster on this machine, beside the broker the
# tests use: nodes sieve-c1..3@localhost on AMQP ports 5701..5703
# (distribution ports 25701..25703), no plugins, data under
# $SIEVE_CLUSTER_DIR (default /var/tmp/sieve-rabbit-cluster). For
# `sieve-tools bench cluster`, which runs items through it while a node is
# stopped and started again (docs/benchmarks.md).
#
#   bash ops/rabbitmq-cluster.sh start        # start the three nodes, clustered
#   bash ops/rabbitmq-cluster.sh urls         # the broker.urls value for them
#   bash ops/rabbitmq-cluster.sh stop-node 2  # shut node 2 down (a node lost)
#   bash ops/rabbitmq-cluster.sh start-node 2 # start it again; it rejoins
#   bash ops/rabbitmq-cluster.sh status
#   bash ops/rabbitmq-cluster.sh stop         # shut every node down, remove the data
#
# Needs root (the nodes run as the rabbitmq user, with its Erlang cookie) and
# the Debian rabbitmq-server package that ops/ensure-services.sh uses.
set -euo pipefail

BASE=${SIEVE_CLUSTER_DIR:-/var/tmp/sieve-rabbit-cluster}
RABBIT_BIN=/usr/lib/rabbitmq/bin
NODES=(1 2 3)

name() { echo "sieve-c$1@localhost"; }
amqp_port() { echo $((5700 + $1)); }
dist_port() { echo $((25700 + $1)); }

as_rabbitmq() {
    su rabbitmq -s /bin/sh -c "cd '$BASE' && export RABBITMQ_CONF_ENV_FILE='$BASE/env.conf' && $*"
}

ctl() {
    local n=$1
    shift
    as_rabbitmq "$RABBIT_BIN/rabbitmqctl -n $(name "$n") $*"
}

prepare() {
    mkdir -p "$BASE"
    # The system's rabbitmq-env.conf names the main node; these nodes have
    # their own (empty but for the address epmd listens on).
    printf 'ERL_EPMD_ADDRESS=127.0.0.1\n' > "$BASE/env.conf"
    for n in "${NODES[@]}"; do
        local dir="$BASE/n$n"
        mkdir -p "$dir"
        printf 'listeners.tcp.local = 127.0.0.1:%s\n' "$(amqp_port "$n")" > "$dir/rabbitmq.conf"
        # RabbitMQ 3.10 ignores a queue's own x-consumer-timeout; as in compose.
        printf 'consumer_timeout = 21600000\n' >> "$dir/rabbitmq.conf"
        printf '[].\n' > "$dir/enabled_plugins"
    done
    chown -R rabbitmq: "$BASE"
}

start_node() {
    local n=$1 dir="$BASE/n$1"
    echo "starting $(name "$n") on 127.0.0.1:$(amqp_port "$n")"
    as_rabbitmq "export RABBITMQ_NODENAME=$(name "$n") RABBITMQ_NODE_PORT=$(amqp_port "$n") \
        RABBITMQ_DIST_PORT=$(dist_port "$n") RABBITMQ_CONFIG_FILE='$dir/rabbitmq.conf' \
        RABBITMQ_MNESIA_BASE='$dir/mnesia' RABBITMQ_LOG_BASE='$dir/log' \
        RABBITMQ_ENABLED_PLUGINS_FILE='$dir/enabled_plugins' RABBITMQ_PID_FILE='$dir/pid' \
        && $RABBIT_BIN/rabbitmq-server -detached"
    # Waits for the pid file, then for the broker to have started.
    ctl "$n" wait "'$dir/pid'" --timeout 120 > /dev/null
}

stop_node() {
    echo "stopping $(name "$1")"
    ctl "$1" shutdown > /dev/null 2>&1 || true
}

case "${1:-}" in
start)
    prepare
    for n in "${NODES[@]}"; do
        start_node "$n"
    done
    for n in "${NODES[@]:1}"; do
        if ! ctl "$n" cluster_status 2> /dev/null | grep -q "$(name 1)"; then
            ctl "$n" stop_app > /dev/null
            ctl "$n" reset > /dev/null
            ctl "$n" join_cluster "$(name 1)" > /dev/null
            ctl "$n" start_app > /dev/null
        fi
    done
    ctl 1 cluster_status | sed -n '/Running Nodes/,/^$/p'
    ;;
urls)
    urls=()
    for n in "${NODES[@]}"; do
        urls+=("amqp://guest:guest@127.0.0.1:$(amqp_port "$n")/%2f")
    done
    (IFS=,; echo "[${urls[*]}]")
    ;;
stop-node)
    stop_node "${2:?which node: 1, 2 or 3}"
    ;;
start-node)
    start_node "${2:?which node: 1, 2 or 3}"
    ;;
status)
    ctl 1 cluster_status 2> /dev/null || ctl 2 cluster_status
    ;;
stop)
    for n in "${NODES[@]}"; do
        stop_node "$n"
    done
    rm -rf "$BASE"
    ;;
*)
    sed -n '2,17p' "$0" | sed 's/^# \{0,1\}//'
    exit 2
    ;;
esac

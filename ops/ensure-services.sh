#!/usr/bin/env bash
# Make sure PostgreSQL, Redis and RabbitMQ answer on their standard local
# ports; start the ones that do not, then wait for them.
set -euo pipefail

answers() { # host port
    (exec 3<>"/dev/tcp/$1/$2") 2>/dev/null
}

wait_for() { # name host port seconds
    local i
    for ((i = 0; i < $4; i++)); do
        if answers "$2" "$3"; then
            echo "$1 is up on $2:$3"
            return 0
        fi
        sleep 1
    done
    echo "error: $1 did not come up on $2:$3 within $4 s" >&2
    return 1
}

if ! answers 127.0.0.1 5432; then
    echo "starting PostgreSQL"
    pg_ctlcluster --skip-systemctl-redirect "$(ls /etc/postgresql)" main start
fi
if ! answers 127.0.0.1 6379; then
    echo "starting Redis"
    mkdir -p /var/lib/redis /var/log/redis
    redis-server --daemonize yes --bind 127.0.0.1 -::1 --port 6379 --save "" --appendonly no \
        --dir /var/lib/redis --logfile /var/log/redis/ci.log
fi
if ! answers 127.0.0.1 5672; then
    echo "starting RabbitMQ"
    rabbitmq-server -detached
fi

wait_for PostgreSQL 127.0.0.1 5432 60
wait_for Redis 127.0.0.1 6379 30
wait_for RabbitMQ 127.0.0.1 5672 120
# The AMQP port opens before the broker accepts logins: wait for the app.
if command -v rabbitmqctl >/dev/null; then
    rabbitmqctl await_startup >/dev/null 2>&1 || true
fi
# The management API gives `sieve status` unacked counts and rates (and the
# tests check that path); enabling it is idempotent and needs no restart.
if command -v rabbitmq-plugins >/dev/null && ! answers 127.0.0.1 15672; then
    echo "enabling the RabbitMQ management plugin"
    rabbitmq-plugins enable rabbitmq_management >/dev/null
    wait_for "RabbitMQ management" 127.0.0.1 15672 60
fi

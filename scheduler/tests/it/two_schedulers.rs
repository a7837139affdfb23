//! Two `sieve serve` processes at once, as a rolling update runs them
//! (issue 25 item 7): both answer the API, and the background loops (the
//! re-dispatch sweeper, automatic retrains, the training watchdog) run in
//! exactly one: the holder of the background lease. When it shuts down the
//! other takes the lease at once; when it is killed, once the lease expires.

#![allow(clippy::unwrap_used)]

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use sea_orm::{ConnectionTrait, DbBackend, Statement};
use sieve_scheduler::auth;
use sieve_scheduler::entities::api_token::Role;
use sieve_scheduler::lease;
use sieve_testkit::Sandbox;

struct Serve {
    child: Child,
    base: String,
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn serve(test: &Sandbox) -> Serve {
    let port = free_port();
    let child = Command::new(env!("CARGO_BIN_EXE_sieve"))
        .arg("serve")
        .env("SIEVE_DATABASE__URL", &test.settings.database.url)
        .env("SIEVE_BROKER__PREFIX", &test.settings.broker.prefix)
        .env("SIEVE_REDIS__PREFIX", &test.settings.redis.prefix)
        .env("SIEVE_STORE__ROOT", test.store.path())
        .env("SIEVE_HTTP__BIND", format!("127.0.0.1:{port}"))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    Serve {
        child,
        base: format!("http://127.0.0.1:{port}"),
    }
}

async fn until<T, F, Fut>(what: &str, timeout: Duration, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let started = Instant::now();
    loop {
        if let Some(value) = check().await {
            return value;
        }
        assert!(started.elapsed() < timeout, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// The process id in the background lease's holder (`host-pid-tail`).
async fn holder_pid(test: &Sandbox) -> Option<u32> {
    let row = test
        .db
        .query_one_raw(Statement::from_sql_and_values(
            DbBackend::Postgres,
            "SELECT holder FROM scheduler_leases WHERE name = $1 AND expires_at > now()",
            [lease::BACKGROUND.into()],
        ))
        .await
        .unwrap()?;
    let holder: String = row.try_get("", "holder").unwrap();
    holder.rsplit('-').nth(1)?.parse().ok()
}

fn signal(child: &Child, signal: &str) {
    Command::new("kill")
        .args([signal, &child.id().to_string()])
        .status()
        .unwrap();
}

#[tokio::test]
async fn two_schedulers_share_the_api_and_one_runs_the_background_loops() {
    let test = Sandbox::start(|s| s.database.max_connections = 20).await;
    let token = auth::create_token(&test.db, "olga", Role::Ops)
        .await
        .unwrap();
    let http = reqwest::Client::new();

    let mut servers = vec![serve(&test), serve(&test)];
    // Both answer the API.
    for s in &servers {
        until(
            "the scheduler to answer",
            Duration::from_secs(60),
            || async {
                let r = http
                    .get(format!("{}/api/v1/status", s.base))
                    .bearer_auth(&token)
                    .send()
                    .await
                    .ok()?;
                (r.status() == 200).then_some(())
            },
        )
        .await;
    }
    // Exactly one of them holds the background lease.
    let first = until("a lease holder", Duration::from_secs(30), || {
        holder_pid(&test)
    })
    .await;
    let pids: Vec<u32> = servers.iter().map(|s| s.child.id()).collect();
    assert!(
        pids.contains(&first),
        "holder {first} is not one of {pids:?}"
    );
    // Renewals keep it where it is.
    tokio::time::sleep(lease::RENEW * 2).await;
    assert_eq!(holder_pid(&test).await, Some(first));

    // The holder shuts down: it gives the lease up, the other takes it at
    // its next try.
    let at = servers.iter().position(|s| s.child.id() == first).unwrap();
    let mut leaving = servers.remove(at);
    signal(&leaving.child, "-TERM");
    assert!(leaving.child.wait().unwrap().success());
    let second = servers[0].child.id();
    until(
        "the other scheduler to take the lease",
        lease::RENEW * 3,
        || async { (holder_pid(&test).await == Some(second)).then_some(()) },
    )
    .await;

    // A new scheduler joins, and the holder is killed: the lease passes once
    // it expires, never to two at once.
    servers.push(serve(&test));
    let third = servers[1].child.id();
    let mut killed = servers.remove(0);
    signal(&killed.child, "-KILL");
    killed.child.wait().unwrap();
    until(
        "the new scheduler to take the expired lease",
        lease::TTL + lease::RENEW * 3,
        || async { (holder_pid(&test).await == Some(third)).then_some(()) },
    )
    .await;

    for mut s in servers {
        signal(&s.child, "-TERM");
        s.child.wait().unwrap();
    }
    // The sandbox removes the queues these servers declared, their Redis
    // keys and the database.
    drop(test);
}

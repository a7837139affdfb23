//! Two scheduler result consumers on the same results queue at once (as two
//! scheduler processes would run them, each with its own broker connection
//! and database pool) give exactly the outcome of one: every item routed
//! once, one prediction per item and version, no duplicated review task or
//! machine label, even with every result delivered twice.

#![allow(clippy::unwrap_used)]

use std::time::{Duration, Instant};

use rand::seq::SliceRandom;
use sea_orm::{ConnectionTrait, DbBackend, Statement};
use sieve_scheduler::context::Context;
use sieve_scheduler::entities::item::ItemState;
use sieve_scheduler::policy::Policy;
use sieve_scheduler::projects::{self, ClassNames, Project, ProjectName};
use sieve_scheduler::routing::results;
use sieve_shared::messages::{ModelArch, PrelabelResult};
use sieve_testkit::{Sandbox, Scored};
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

const ITEMS: usize = 400;

/// A project whose active version is trained (routes by the policy), with a
/// fixed threshold of 0.9 and no audits, so routing is decided by hand.
async fn project_with_model(db: &sea_orm::DatabaseConnection) -> (Project, Uuid) {
    let policy = Policy {
        audit_rate: 0.0,
        ..Policy::default()
    };
    let project = projects::create(
        db,
        &ProjectName::parse("scale-out").unwrap(),
        &ClassNames::parse(&["a".into(), "b".into(), "c".into()]).unwrap(),
        &policy,
        ModelArch::SmallCnn,
        sieve_shared::kind::TaskKind::Classification,
    )
    .await
    .unwrap();
    sieve_testkit::activate_stub(db, &project, None).await
}

/// Item `n`'s result: sure of class `n % 3` for even `n`, unsure for odd.
fn result(project: &Project, version: Uuid, item: Uuid, n: usize) -> PrelabelResult {
    let class = (n % 3) as u32;
    let confidence = if n.is_multiple_of(2) { 0.97 } else { 0.5 };
    Scored::class(class, confidence, 3).result(project.id, version, item)
}

async fn count(db: &sea_orm::DatabaseConnection, sql: &str) -> i64 {
    db.query_one_raw(Statement::from_string(DbBackend::Postgres, sql))
        .await
        .unwrap()
        .unwrap()
        .try_get_by_index::<i64>(0)
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_result_consumers_give_the_outcome_of_one() {
    // Small batches, so both consumers get many.
    let sandbox = Sandbox::start(|s| s.review.results_batch = 16).await;
    let settings = sandbox.settings.clone();
    let conn = sandbox.db.clone();
    let (project, version) = project_with_model(&conn).await;
    let mut items = Vec::with_capacity(ITEMS);
    for n in 0..ITEMS {
        items.push(sieve_testkit::insert_item(&conn, &project, n, ItemState::Queued).await);
    }

    // Two schedulers: each its own context (pool, publisher) and consuming
    // connection.
    let stop = CancellationToken::new();
    let mut consumers = Vec::new();
    let mut contexts = Vec::new();
    for n in 0..2 {
        let ctx = Context::connect(settings.clone()).await.unwrap();
        let connection = std::sync::Arc::new(
            sieve_shared::broker::connect(&settings.broker, &format!("test consumer {n}"))
                .await
                .unwrap(),
        );
        consumers.push(tokio::spawn(results::run(
            ctx.clone(),
            connection,
            stop.clone(),
        )));
        contexts.push(ctx);
    }
    let queue = contexts[0].topology().results_queue();
    let start = Instant::now();
    loop {
        let (_, consumers) = sieve_shared::broker::queue_counts(&contexts[0].connection, &queue)
            .await
            .unwrap();
        if consumers == 2 {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "consumers did not start"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // Every result twice (a worker that crashed after publishing and before
    // its ack sends it again, with a new job id), shuffled so the copies of
    // one result land in different batches and consumers.
    let mut messages = Vec::with_capacity(2 * ITEMS);
    for (n, item) in items.iter().enumerate() {
        messages.push(result(&project, version, *item, n));
        messages.push(result(&project, version, *item, n));
    }
    messages.shuffle(&mut rand::rng());
    contexts[0].publisher.publish_all(&messages).await.unwrap();

    // Wait until both copies of everything were taken and applied: the
    // queue is empty and every item has its prediction.
    let start = Instant::now();
    loop {
        let (ready, _) = sieve_shared::broker::queue_counts(&contexts[0].connection, &queue)
            .await
            .unwrap();
        let predicted = count(&conn, "SELECT count(*) FROM predictions").await;
        if ready == 0 && predicted == ITEMS as i64 {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "results not applied: {ready} ready, {predicted} predictions"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Stopping lets each consumer finish and acknowledge its batch in flight.
    stop.cancel();
    for consumer in consumers {
        consumer.await.unwrap().unwrap();
    }
    let (ready, _) = sieve_shared::broker::queue_counts(&contexts[0].connection, &queue)
        .await
        .unwrap();
    assert_eq!(ready, 0, "every delivery was acknowledged");

    let half = (ITEMS / 2) as i64;
    let checks = [
        (
            "predictions",
            "SELECT count(*) FROM predictions",
            ITEMS as i64,
        ),
        (
            "predictions per (item, version)",
            "SELECT count(DISTINCT (item_id, model_version_id)) FROM predictions",
            ITEMS as i64,
        ),
        (
            "predictions routed",
            "SELECT count(*) FROM predictions WHERE routed_to IS NOT NULL AND policy_version = 1",
            ITEMS as i64,
        ),
        (
            "routed to machine labels",
            "SELECT count(*) FROM predictions WHERE routed_to = 'auto_labeled'",
            half,
        ),
        ("machine labels", "SELECT count(*) FROM labels", half),
        (
            "machine-labeled items",
            "SELECT count(DISTINCT item_id) FROM labels WHERE source = 'machine'",
            half,
        ),
        ("review tasks", "SELECT count(*) FROM review_tasks", half),
        (
            "open review tasks on distinct items",
            "SELECT count(DISTINCT item_id) FROM review_tasks WHERE state = 'open'",
            half,
        ),
        (
            "items auto_labeled",
            "SELECT count(*) FROM items WHERE state = 'auto_labeled'",
            half,
        ),
        (
            "items in_review",
            "SELECT count(*) FROM items WHERE state = 'in_review'",
            half,
        ),
        // By hand: even items are sure (machine label of class n % 3), odd
        // ones go to review; the item number is in its source name.
        (
            "machine labels on the sure items, of their class",
            "SELECT count(*) FROM labels l JOIN items i ON i.id = l.item_id \
             WHERE (substring(i.source from 'img-(\\d+)')::int) % 2 = 0 \
               AND l.class_index = (substring(i.source from 'img-(\\d+)')::int) % 3",
            half,
        ),
        (
            "review tasks on the unsure items",
            "SELECT count(*) FROM review_tasks t JOIN items i ON i.id = t.item_id \
             WHERE (substring(i.source from 'img-(\\d+)')::int) % 2 = 1",
            half,
        ),
    ];
    let mut wrong = Vec::new();
    for (what, sql, expected) in checks {
        let got = count(&conn, sql).await;
        if got != expected {
            wrong.push(format!("{what}: {got}, expected {expected}"));
        }
    }

    for ctx in &contexts {
        ctx.db.clone().close().await.ok();
    }
    drop(sandbox);
    assert!(wrong.is_empty(), "{wrong:#?}");
}

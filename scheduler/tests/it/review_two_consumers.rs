//! Two scheduler result consumers on the same results queue at once (as two
//! scheduler processes would run them, each with its own broker connection
//! and database pool) give exactly the outcome of one: every item routed
//! once, one prediction per item and version, no duplicated review task or
//! machine label, even with every result delivered twice.

#![allow(clippy::unwrap_used)]

mod common;

use std::time::{Duration, Instant};

use chrono::Utc;
use rand::seq::SliceRandom;
use sea_orm::{ActiveValue::Set, ConnectionTrait, DbBackend, EntityTrait, Statement};
use sieve_scheduler::context::{self, Context};
use sieve_scheduler::db;
use sieve_scheduler::entities::item::ItemState;
use sieve_scheduler::entities::model_version::{self, VersionStatus};
use sieve_scheduler::entities::project;
use sieve_scheduler::policy::Policy;
use sieve_scheduler::projects::{self, ClassNames, Project, ProjectName};
use sieve_scheduler::routing::results;
use sieve_shared::Settings;
use sieve_shared::ids::{ItemId, JobId, ModelVersionId};
use sieve_shared::messages::{
    ModelArch, PredictionOutput, PrelabelOutcome, PrelabelResult, SCHEMA_VERSION,
};
use sieve_shared::scores::Scores;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

const ITEMS: usize = 400;

fn settings() -> Settings {
    let id = Uuid::now_v7().simple().to_string();
    let tag = &id[id.len() - 12..];
    let mut settings = Settings::default();
    settings.database.url = format!("postgres://postgres@127.0.0.1:5432/sieve_test_{tag}");
    settings.database.max_connections = 5;
    settings.broker.prefix = format!("test-{tag}");
    settings.redis.prefix = format!("test-{tag}");
    // Small batches, so both consumers get many.
    settings.review.results_batch = 16;
    settings
}

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
    )
    .await
    .unwrap();
    let version = Uuid::now_v7();
    model_version::Entity::insert(model_version::ActiveModel {
        id: Set(version),
        project_id: Set(project.id.as_uuid()),
        version: Set(1),
        parent_id: Set(None),
        training_run_id: Set(None),
        artifact_key: Set(Some("m".into())),
        checksum: Set(Some("c".into())),
        architecture: Set(None),
        metrics: Set(None),
        calibration: Set(None),
        status: Set(VersionStatus::Active),
        status_reason: Set(None),
        created_at: Set(Utc::now().fixed_offset()),
        activated_at: Set(Some(Utc::now().fixed_offset())),
    })
    .exec_without_returning(db)
    .await
    .unwrap();
    project::Entity::update(project::ActiveModel {
        id: Set(project.id.as_uuid()),
        active_model_version_id: Set(Some(version)),
        ..Default::default()
    })
    .exec(db)
    .await
    .unwrap();
    (projects::get(db, "scale-out").await.unwrap(), version)
}

/// Item `n`'s result: sure of class `n % 3` for even `n`, unsure for odd.
fn result(project: &Project, version: Uuid, item: Uuid, n: usize) -> PrelabelResult {
    let class = (n % 3) as u32;
    let confidence = if n.is_multiple_of(2) { 0.97 } else { 0.5 };
    let mut probabilities = vec![(1.0 - confidence) / 2.0; 3];
    probabilities[class as usize] = confidence;
    PrelabelResult {
        schema: SCHEMA_VERSION,
        job_id: JobId::new(),
        project_id: project.id,
        item_id: ItemId::from_uuid(item),
        model_version_id: ModelVersionId::from_uuid(version),
        worker_id: "test".into(),
        outcome: PrelabelOutcome::Scored(PredictionOutput {
            probabilities,
            member_votes: vec![class, class, class],
            scores: Scores {
                top_class: class,
                confidence,
                margin: 0.5,
                entropy: 0.5,
                disagreement: 0.0,
                mutual_information: 0.0,
            },
            embedding: None,
        }),
    }
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
    sieve_shared::telemetry::init_test_tracing();
    let settings = settings();
    db::create_database_if_missing(&settings.database.url)
        .await
        .unwrap();
    let conn = db::connect(&settings.database).await.unwrap();
    db::migrate(&conn).await.unwrap();
    let (project, version) = project_with_model(&conn).await;
    let mut items = Vec::with_capacity(ITEMS);
    for n in 0..ITEMS {
        items.push(common::insert_item(&conn, &project, n, ItemState::Queued).await);
    }

    // Two schedulers: each its own context (pool, publisher) and consuming
    // connection.
    let stop = CancellationToken::new();
    let mut consumers = Vec::new();
    let mut contexts = Vec::new();
    for n in 0..2 {
        let ctx = Context::connect(settings.clone()).await.unwrap();
        let connection = std::sync::Arc::new(
            sieve_shared::broker::connect(&settings.broker.url, &format!("test consumer {n}"))
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
        let channel = ctx.connection.create_channel().await.unwrap();
        context::topology(&settings).delete(&channel).await.ok();
        ctx.db.clone().close().await.ok();
    }
    conn.close().await.ok();
    db::drop_database(&settings.database.url).await.unwrap();
    assert!(wrong.is_empty(), "{wrong:#?}");
}

//! What operators see and replay, on the real services: worker heartbeats
//! (a SIGKILLed worker becomes lost), fleet status, Prometheus metrics of
//! both services, and dead letters listed and retried through the normal
//! path exactly once.

#![allow(clippy::unwrap_used)]

use std::process::{Command, Stdio};
use std::time::Duration;

use crate::sieve::TestSieve;
use lapin::types::{AMQPValue, FieldTable, LongString};
use sea_orm::sea_query::Expr;
use sea_orm::{ColumnTrait, EntityTrait, PaginatorTrait, QueryFilter};
use sieve_scheduler::entities::{item, label, prediction, review_task};
use sieve_scheduler::operate::failed;
use sieve_scheduler::operate::status;
use sieve_scheduler::operate::workers;
use sieve_scheduler::policy::Policy;
use sieve_scheduler::projects;
use sieve_scheduler::{dispatch, ingest};
use sieve_shared::ids::{ItemId, JobId};
use sieve_shared::messages::{PrelabelJob, SCHEMA_VERSION, encode};
use sieve_shared::topology::Route;
use sieve_testkit::eventually;
use sieve_tools::fashion_mnist::Split;

const WAIT: Duration = Duration::from_secs(60);

/// Every sample line of a Prometheus text page: `name{labels} value`.
fn parse_prometheus(text: &str) -> Vec<(String, f64)> {
    text.lines()
        .filter(|l| !l.trim().is_empty() && !l.starts_with('#'))
        .map(|l| {
            let (name, value) = l
                .rsplit_once(' ')
                .unwrap_or_else(|| panic!("bad sample line {l:?}"));
            let value: f64 = value
                .parse()
                .unwrap_or_else(|_| panic!("bad value in {l:?}"));
            (name.to_owned(), value)
        })
        .collect()
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn fleet_heartbeats_metrics_and_dead_letter_replay() {
    let sieve = TestSieve::start().await;
    let db = &sieve.ctx.db;

    // A second worker, as a real process, then killed without warning.
    let port = free_port();
    let mut process = Command::new(env!("CARGO_BIN_EXE_sieve-worker"))
        .args([
            "--capabilities",
            "prelabel",
            "--listen",
            &format!("127.0.0.1:{port}"),
        ])
        .env("SIEVE_BROKER__PREFIX", &sieve.settings.broker.prefix)
        .env("SIEVE_REDIS__PREFIX", &sieve.settings.redis.prefix)
        .env("SIEVE_STORE__ROOT", &sieve.settings.store.root)
        .env("SIEVE_WORKER__HEARTBEAT_SECONDS", "1")
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    let alive = eventually("two live workers", WAIT, || async {
        let w = workers::list(&sieve.settings.redis).await.ok()?;
        (w.iter().filter(|w| !w.lost).count() == 2).then_some(w)
    })
    .await;
    assert_eq!(alive.len(), 2);

    // Work flows: a project, its first model, a few images.
    let project = crate::sieve::fashion_project(&sieve, "ops", Policy::default()).await;
    let (dir, _) = crate::sieve::fashion_images(Split::Train, 12);
    ingest::ingest_folder(&sieve.ctx, &project, dir.path(), false)
        .await
        .unwrap();
    eventually("all predicted", WAIT, || async {
        let n = prediction::Entity::find().count(db).await.ok()?;
        (n == 12).then_some(())
    })
    .await;

    // Both services expose Prometheus text whose counters moved (the
    // scheduler's to an ops token).
    let scheduler_metrics = sieve.scheduler_metrics().await;
    let samples = parse_prometheus(&scheduler_metrics);
    let routed: f64 = samples
        .iter()
        .filter(|(n, _)| n.starts_with("sieve_results_routed_total"))
        .map(|(_, v)| v)
        .sum();
    assert!(routed >= 12.0, "results routed counter moved: {routed}");
    let worker_metrics = reqwest::get(format!("http://127.0.0.1:{port}/metrics"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let worker_samples = parse_prometheus(&worker_metrics);
    println!(
        "scheduler exposes {} samples, worker {}",
        samples.len(),
        worker_samples.len()
    );
    let consumed: f64 = worker_samples
        .iter()
        .filter(|(n, _)| n.starts_with("sieve_worker_jobs_consumed_total"))
        .map(|(_, v)| v)
        .sum();
    assert!(
        consumed > 0.0,
        "the worker process counted the jobs it consumed"
    );
    let health = reqwest::get(format!("http://127.0.0.1:{port}/healthz"))
        .await
        .unwrap();
    assert_eq!(health.status(), 200);

    // GET /api/v1/status is for operators.
    let ops = sieve_scheduler::auth::create_token(
        db,
        "ops",
        sieve_scheduler::entities::api_token::Role::Ops,
    )
    .await
    .unwrap();
    let reviewer = sieve_scheduler::auth::create_token(
        db,
        "rev",
        sieve_scheduler::entities::api_token::Role::Reviewer,
    )
    .await
    .unwrap();
    let url = format!("{}/api/v1/status", sieve.api);
    let forbidden = sieve
        .http
        .get(&url)
        .bearer_auth(&reviewer)
        .send()
        .await
        .unwrap();
    assert_eq!(forbidden.status(), 403);
    let fleet_json: serde_json::Value = sieve
        .http
        .get(&url)
        .bearer_auth(&ops)
        .send()
        .await
        .unwrap()
        .error_for_status()
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(fleet_json["workers_alive"], 2);
    // Four work queues, the dead letters, and the delay queues as one line.
    assert_eq!(fleet_json["queues"].as_array().unwrap().len(), 6);

    // Fleet status sees the queues, the workers and the project.
    let fleet = status::fleet_status(&sieve.ctx).await.unwrap();
    assert_eq!(fleet.queues.len(), 6);
    let retries = fleet.queues.last().unwrap();
    assert_eq!(
        retries.name,
        format!("{}.prelabel.retry.*", sieve.settings.broker.prefix)
    );
    assert_eq!((retries.ready, retries.consumers), (0, 0));
    assert!(fleet.queue_source.starts_with("passive declare"));
    assert_eq!(fleet.workers_alive, 2);
    assert_eq!(fleet.projects[0].total_items, 12);

    // With the management API (ops/ensure-services.sh enables it): unacked
    // counts and rates, and it says where the figures came from.
    let mut managed = sieve.ctx.clone();
    let mut settings = (*managed.settings).clone();
    settings.broker.management_url = Some("http://guest:guest@127.0.0.1:15672".into());
    managed.settings = std::sync::Arc::new(settings);
    let fleet = status::fleet_status(&managed).await.unwrap();
    assert_eq!(fleet.queue_source, "management");
    // (Counts appear once the broker has sampled the queues: every 5 s.)
    assert_eq!(fleet.queues.len(), 6);

    // SIGKILL: no clean exit, so the worker is shown as lost by server time.
    process.kill().unwrap();
    process.wait().unwrap();
    let lost = eventually("the killed worker to be lost", WAIT, || async {
        let w = workers::list(&sieve.settings.redis).await.ok()?;
        let lost: Vec<_> = w.into_iter().filter(|w| w.lost).collect();
        (lost.len() == 1).then_some(lost)
    })
    .await;
    assert!(lost[0].seconds_since_seen >= 3);

    // Dead letters: one poison message, one valid job that was dead-lettered.
    let poison = b"{not json".to_vec();
    sieve
        .ctx
        .publisher
        .publish_payloads(Route::Prelabel, &[poison], None)
        .await
        .unwrap();
    let item = item::Entity::find()
        .filter(item::Column::ProjectId.eq(project.id.as_uuid()))
        .one(db)
        .await
        .unwrap()
        .unwrap();
    let project = projects::get(db, "ops").await.unwrap();
    let model = dispatch::active_model(&sieve.ctx, &project)
        .await
        .unwrap()
        .unwrap();
    // The item is fully predicted; drop its prediction so the replayed job has work to do.
    review_task::Entity::update_many()
        .col_expr(
            review_task::Column::PredictionId,
            Expr::value(Option::<uuid::Uuid>::None),
        )
        .filter(review_task::Column::ItemId.eq(item.id))
        .exec(db)
        .await
        .unwrap();
    label::Entity::update_many()
        .col_expr(
            label::Column::PredictionId,
            Expr::value(Option::<uuid::Uuid>::None),
        )
        .filter(label::Column::ItemId.eq(item.id))
        .exec(db)
        .await
        .unwrap();
    prediction::Entity::delete_many()
        .filter(prediction::Column::ItemId.eq(item.id))
        .exec(db)
        .await
        .unwrap();
    let job = PrelabelJob {
        size_bytes: None,
        schema: SCHEMA_VERSION,
        job_id: JobId::new(),
        project_id: project.id,
        item_id: ItemId::from_uuid(item.id),
        object_key: item.object_key.clone(),
        model,
    };
    let mut headers = FieldTable::default();
    let s = |v: &str| AMQPValue::LongString(LongString::from(v.to_owned()));
    headers.insert(
        "x-first-death-queue".into(),
        s(&sieve.ctx.topology().prelabel_queue()),
    );
    headers.insert("x-first-death-reason".into(), s("delivery_limit"));
    sieve
        .ctx
        .publisher
        .publish_payloads(Route::Dead, &[encode(&job)], Some(headers))
        .await
        .unwrap();

    let dead = eventually("two dead letters", WAIT, || async {
        let d = failed::dead_letters(&sieve.ctx, 10).await.ok()?;
        (d.len() == 2).then_some(d)
    })
    .await;
    let rejected = dead
        .iter()
        .find(|d| d.reason == "rejected")
        .expect("the poison message was dead-lettered");
    assert!(
        rejected.summary.starts_with("undecodable"),
        "{}",
        rejected.summary
    );
    assert!(
        dead.iter()
            .any(|d| d.reason == "delivery_limit" && d.summary.contains("prelabel job"))
    );

    // Retry that one alone, by its position in the list.
    let position = dead
        .iter()
        .find(|d| d.reason == "delivery_limit")
        .unwrap()
        .position;
    let report = failed::retry_dead_at(&sieve.ctx, position).await.unwrap();
    assert_eq!(report.retried, 1);
    assert!(
        report.skipped.is_empty(),
        "the poison message was not touched"
    );
    eventually("the replayed job to complete", WAIT, || async {
        let n = prediction::Entity::find()
            .filter(prediction::Column::ItemId.eq(item.id))
            .count(db)
            .await
            .ok()?;
        (n == 1).then_some(())
    })
    .await;
    // Retrying everything now skips the poison message and changes nothing else.
    let report = failed::retry_dead(&sieve.ctx, None).await.unwrap();
    assert_eq!(report.retried, 0);
    assert_eq!(report.skipped.len(), 1, "{:?}", report.skipped);
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(
        prediction::Entity::find()
            .filter(prediction::Column::ItemId.eq(item.id))
            .count(db)
            .await
            .unwrap(),
        1,
        "the replayed job completed exactly once"
    );
    assert_eq!(failed::purge_dead(&sieve.ctx).await.unwrap(), 1);
    sieve.teardown().await;
}

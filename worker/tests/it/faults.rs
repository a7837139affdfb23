//! Faults injected into the real services, each followed by exact
//! accounting: every image is one item in one state, no prediction is
//! duplicated per model version, no version is registered twice, and every
//! poison message is kept in the dead-letter queue with its reason.

#![allow(clippy::unwrap_used)]

use std::collections::HashSet;
use std::time::Duration;

use crate::sieve::TestSieve;
use redis::AsyncCommands;
use sea_orm::{ColumnTrait, EntityTrait, PaginatorTrait, QueryFilter};
use sieve_scheduler::entities::item::{self, ItemState};
use sieve_scheduler::entities::model_version::{self, VersionStatus};
use sieve_scheduler::entities::{label, prediction};
use sieve_scheduler::operate::failed;
use sieve_scheduler::operate::workers;
use sieve_scheduler::policy::Policy;
use sieve_scheduler::projects::Project;
use sieve_scheduler::{dispatch, ingest};
use sieve_shared::ids::{ItemId, JobId};
use sieve_shared::messages::{ControlCommand, ControlMessage, PrelabelJob, SCHEMA_VERSION};
use sieve_shared::topology::Route;
use sieve_testkit::eventually;
use sieve_tools::fashion_mnist::Split;
use uuid::Uuid;

const WAIT: Duration = Duration::from_secs(90);

async fn project_with_images(sieve: &TestSieve, name: &str, images: usize) -> Project {
    let project = crate::sieve::fashion_project(sieve, name, Policy::default()).await;
    let (dir, _) = crate::sieve::fashion_images(Split::Train, images);
    ingest::ingest_folder(&sieve.ctx, &project, dir.path(), false)
        .await
        .unwrap();
    project
}

/// Items by state; asserts each item is counted once and nothing is queued.
async fn account(sieve: &TestSieve, project: &Project, images: u64) -> Vec<(ItemState, u64)> {
    let db = &sieve.ctx.db;
    let mut counts = Vec::new();
    let mut total = 0;
    for state in [
        ItemState::Queued,
        ItemState::InReview,
        ItemState::AutoLabeled,
        ItemState::HumanLabeled,
        ItemState::Failed,
    ] {
        let n = item::Entity::find()
            .filter(item::Column::ProjectId.eq(project.id.as_uuid()))
            .filter(item::Column::State.eq(state))
            .count(db)
            .await
            .unwrap();
        total += n;
        counts.push((state, n));
    }
    assert_eq!(total, images, "every image is exactly one item");
    let predictions = prediction::Entity::find().all(db).await.unwrap();
    let keys: HashSet<(Uuid, Uuid)> = predictions
        .iter()
        .map(|p| (p.item_id, p.model_version_id))
        .collect();
    assert_eq!(
        keys.len(),
        predictions.len(),
        "no duplicate prediction per item and version"
    );
    let machine = label::Entity::find().all(db).await.unwrap();
    let labeled: HashSet<Uuid> = machine.iter().map(|l| l.item_id).collect();
    assert_eq!(
        labeled.len(),
        machine.len(),
        "at most one label per item here"
    );
    println!(
        "accounting: {counts:?}, {} predictions, {} labels",
        predictions.len(),
        machine.len()
    );
    counts
}

async fn settled(sieve: &TestSieve, project: &Project) {
    eventually("nothing queued", WAIT, || async {
        let n = item::Entity::find()
            .filter(item::Column::ProjectId.eq(project.id.as_uuid()))
            .filter(item::Column::State.eq(ItemState::Queued))
            .count(&sieve.ctx.db)
            .await
            .ok()?;
        (n == 0).then_some(())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn duplicate_deliveries_change_nothing() {
    let sieve = TestSieve::start().await;
    let db = &sieve.ctx.db;
    let project = project_with_images(&sieve, "dupes", 30).await;
    settled(&sieve, &project).await;
    let before = account(&sieve, &project, 30).await;
    let predictions_before = prediction::Entity::find().count(db).await.unwrap();

    // Every prediction job again, twice over (as a redelivery storm would).
    let model = dispatch::active_model(&sieve.ctx, &project)
        .await
        .unwrap()
        .unwrap();
    let items = item::Entity::find()
        .filter(item::Column::ProjectId.eq(project.id.as_uuid()))
        .all(db)
        .await
        .unwrap();
    let jobs: Vec<PrelabelJob> = items
        .iter()
        .flat_map(|i| {
            (0..2).map(|_| PrelabelJob {
                size_bytes: None,
                schema: SCHEMA_VERSION,
                job_id: JobId::new(),
                project_id: project.id,
                item_id: ItemId::from_uuid(i.id),
                object_key: i.object_key.clone(),
                model: model.clone(),
            })
        })
        .collect();
    sieve.ctx.publisher.publish_all(&jobs).await.unwrap();
    // The activation notice twice, too.
    let notice = ControlMessage {
        schema: SCHEMA_VERSION,
        command: ControlCommand::Activate {
            project_id: project.id,
            model: model.clone(),
        },
    };
    sieve
        .ctx
        .publisher
        .publish_all(&[notice.clone(), notice])
        .await
        .unwrap();

    // Let every duplicate go through the worker and the router.
    let deadline = std::time::Instant::now() + WAIT;
    loop {
        let (ready, _) = sieve_shared::broker::queue_counts(
            &sieve.ctx.connection,
            &sieve.ctx.topology().prelabel_queue(),
        )
        .await
        .unwrap();
        let (results, _) = sieve_shared::broker::queue_counts(
            &sieve.ctx.connection,
            &sieve.ctx.topology().results_queue(),
        )
        .await
        .unwrap();
        if ready == 0 && results == 0 {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "duplicates were not drained"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(
        prediction::Entity::find().count(db).await.unwrap(),
        predictions_before
    );
    assert_eq!(
        account(&sieve, &project, 30).await,
        before,
        "states unchanged by duplicates"
    );

    // A training run whose completion is delivered twice registers one version.
    let versions_before = model_version::Entity::find().count(db).await.unwrap();
    let run =
        sieve_scheduler::training::request(&sieve.ctx, &project, "test", Default::default(), true)
            .await
            .unwrap();
    eventually("the new version", WAIT, || async {
        let v = model_version::Entity::find()
            .filter(model_version::Column::Version.eq(run.version))
            .one(db)
            .await
            .ok()??;
        (v.status == VersionStatus::Active).then_some(())
    })
    .await;
    let v = model_version::Entity::find()
        .filter(model_version::Column::Version.eq(run.version))
        .one(db)
        .await
        .unwrap()
        .unwrap();
    let replay = sieve_shared::messages::TrainEvent {
        schema: SCHEMA_VERSION,
        run_id: sieve_shared::ids::TrainingRunId::from_uuid(run.run_id),
        project_id: project.id,
        version_id: sieve_shared::ids::ModelVersionId::from_uuid(v.id),
        kind: sieve_shared::messages::TrainEventKind::Completed {
            artifact_key: v.artifact_key.clone().unwrap(),
            checksum: v.checksum.clone().unwrap(),
            architecture: v.architecture.clone().unwrap(),
            metrics: Default::default(),
        },
    };
    sieve.ctx.publisher.publish(&replay).await.unwrap();
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(
        model_version::Entity::find().count(db).await.unwrap(),
        versions_before + 1
    );
    // A worker starting the finished run again (its job redelivered) is
    // told to stop: the scheduler answers with a cancel notice.
    let channel = sieve.ctx.connection.create_channel().await.unwrap();
    let notices = channel
        .queue_declare(
            "".into(),
            lapin::options::QueueDeclareOptions {
                exclusive: true,
                ..Default::default()
            },
            Default::default(),
        )
        .await
        .unwrap();
    channel
        .queue_bind(
            notices.name().clone(),
            sieve.ctx.topology().control_exchange().into(),
            "".into(),
            Default::default(),
            Default::default(),
        )
        .await
        .unwrap();
    let started_again = sieve_shared::messages::TrainEvent {
        kind: sieve_shared::messages::TrainEventKind::Started {
            worker_id: "late-worker".into(),
        },
        ..replay.clone()
    };
    sieve.ctx.publisher.publish(&started_again).await.unwrap();
    let notice = eventually("a cancel notice", WAIT, || async {
        let got = channel
            .basic_get(notices.name().clone(), Default::default())
            .await
            .ok()??;
        Some(sieve_shared::messages::decode::<ControlMessage>(&got.delivery.data).unwrap())
    })
    .await;
    assert!(
        matches!(notice.command, ControlCommand::CancelTraining { run_id } if run_id.as_uuid() == run.run_id),
        "{notice:?}"
    );
    channel.close(200, "done".into()).await.ok();
    let ended = sieve_scheduler::entities::training_run::Entity::find_by_id(run.run_id)
        .one(db)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        ended.state,
        sieve_scheduler::entities::training_run::RunState::Succeeded,
        "a late start changes nothing"
    );
    let active = model_version::Entity::find()
        .filter(model_version::Column::Status.eq(VersionStatus::Active))
        .count(db)
        .await
        .unwrap();
    assert_eq!(active, 1, "one active version");
    settled(&sieve, &project).await;
    account(&sieve, &project, 30).await;
    sieve.teardown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn poison_messages_are_dead_lettered_and_work_goes_on() {
    let sieve = TestSieve::start().await;
    let project = project_with_images(&sieve, "poison", 10).await;
    settled(&sieve, &project).await;

    // Invalid JSON and a wrong schema version on every queue a service consumes.
    let mut wrong_schema = serde_json::to_value(PrelabelJob {
        size_bytes: None,
        schema: SCHEMA_VERSION,
        job_id: JobId::new(),
        project_id: project.id,
        item_id: ItemId::new(),
        object_key: "x".into(),
        model: dispatch::active_model(&sieve.ctx, &project)
            .await
            .unwrap()
            .unwrap(),
    })
    .unwrap();
    wrong_schema["schema"] = 99.into();
    let poisons = [b"{oops".to_vec(), wrong_schema.to_string().into_bytes()];
    for route in [
        Route::Prelabel,
        Route::Results,
        Route::Train,
        Route::TrainEvents,
    ] {
        sieve
            .ctx
            .publisher
            .publish_payloads(route, &poisons, None)
            .await
            .unwrap();
    }
    let dead = eventually("eight dead letters", WAIT, || async {
        let d = failed::dead_letters(&sieve.ctx, 50).await.ok()?;
        println!(
            "dead letters: {} {:?}",
            d.len(),
            d.iter().map(|d| (&d.queue, &d.reason)).collect::<Vec<_>>()
        );
        (d.len() == 8).then_some(d)
    })
    .await;
    for d in &dead {
        assert_eq!(d.reason, "rejected");
        assert!(d.summary.starts_with("undecodable"), "{}", d.summary);
    }
    let from: HashSet<&str> = dead.iter().map(|d| d.queue.as_str()).collect();
    assert_eq!(from.len(), 4, "one pair from each queue");

    // The services are still working: new images flow through.
    let (dir, _) = crate::sieve::fashion_images(Split::Test, 5);
    let summary = ingest::ingest_folder(&sieve.ctx, &project, dir.path(), false)
        .await
        .unwrap();
    assert_eq!(summary.new_items, 5);
    settled(&sieve, &project).await;
    account(&sieve, &project, 15).await;
    sieve.teardown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn losing_redis_loses_nothing() {
    let sieve = TestSieve::start().await;
    let project = project_with_images(&sieve, "redis", 10).await;
    settled(&sieve, &project).await;
    let before = account(&sieve, &project, 10).await;

    // Drop everything this deployment keeps in Redis (FLUSHALL would also
    // wipe the tests running beside this one; the effect on us is the same).
    let mut redis = sieve_shared::live::connect(&sieve.settings.redis.url)
        .await
        .unwrap();
    let keys: Vec<String> = redis
        .keys(format!("{}:*", sieve.settings.redis.prefix))
        .await
        .unwrap();
    assert!(!keys.is_empty(), "the worker's heartbeat was there");
    let _: () = redis.del(keys).await.unwrap();
    assert!(
        workers::list(&sieve.settings.redis)
            .await
            .unwrap()
            .is_empty()
    );

    // Nothing in PostgreSQL changed; the heartbeat comes back by itself and
    // work goes on.
    assert_eq!(account(&sieve, &project, 10).await, before);
    eventually("the heartbeat to return", WAIT, || async {
        let w = workers::list(&sieve.settings.redis).await.ok()?;
        (w.len() == 1 && !w[0].lost).then_some(())
    })
    .await;
    let (dir, _) = crate::sieve::fashion_images(Split::Test, 5);
    ingest::ingest_folder(&sieve.ctx, &project, dir.path(), false)
        .await
        .unwrap();
    settled(&sieve, &project).await;
    account(&sieve, &project, 15).await;
    sieve.teardown().await;
}

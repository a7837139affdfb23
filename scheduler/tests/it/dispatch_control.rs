//! Per-project dispatch control on the real PostgreSQL and RabbitMQ: pause,
//! resume, the publish rate limit and the priority jobs carry. Each test has
//! its own database, queue prefix and store; no worker runs, so the
//! prelabel queue holds exactly what was published.

#![allow(clippy::unwrap_used)]

use std::collections::HashSet;
use std::time::{Duration, Instant};

use chrono::Utc;
use sieve_scheduler::dispatch::{self, ControlChange, Sweep};
use sieve_scheduler::ingest;
use sieve_testkit::{ProjectEnv, item_ids, pngs};
use uuid::Uuid;

#[tokio::test]
async fn a_paused_project_publishes_nothing_and_resume_publishes_each_waiting_item_once() {
    let env = ProjectEnv::start("control", |s| s.ingest.batch_size = 4).await;
    let control = dispatch::pause(&env.ctx, &env.project).await.unwrap();
    assert!(control.paused);

    // Ingest while paused: items recorded, no job.
    let dir = tempfile::tempdir().unwrap();
    pngs(dir.path(), 1, 7);
    let summary = ingest::ingest_folder(&env.ctx, &env.project, dir.path(), false)
        .await
        .unwrap();
    assert_eq!(
        (summary.new_items, summary.dispatched),
        (7, 0),
        "{summary:?}"
    );
    assert_eq!(env.jobs(0).await, 0);
    assert!(env.items().await.iter().all(|i| i.dispatched_at.is_none()));

    // Neither a rescore nor a sweep publishes for a paused project.
    assert_eq!(
        dispatch::dispatch_pending(&env.ctx, &env.project, None)
            .await
            .unwrap(),
        0
    );
    let future = Utc::now() + chrono::Duration::hours(1);
    let sweep = Sweep {
        created_before: future,
        dispatched_before: Some(future),
    };
    assert_eq!(
        dispatch::dispatch_pending(&env.ctx, &env.project, Some(sweep))
            .await
            .unwrap(),
        0
    );
    assert_eq!(env.jobs(0).await, 0, "paused: nothing published");

    // Resume: each waiting item once; again: nothing more.
    assert_eq!(dispatch::resume(&env.ctx, &env.project).await.unwrap(), 7);
    assert_eq!(dispatch::resume(&env.ctx, &env.project).await.unwrap(), 0);
    assert_eq!(
        dispatch::dispatch_unpublished(&env.ctx, &env.project)
            .await
            .unwrap(),
        0
    );
    assert_eq!(env.jobs(7).await, 7);
    let jobs = env.drain().await;
    let published = item_ids(&jobs);
    let items: HashSet<Uuid> = env.items().await.iter().map(|i| i.id).collect();
    assert_eq!(jobs.len(), 7, "one job per item");
    assert_eq!(published, items, "every waiting item, exactly once");
    assert!(env.items().await.iter().all(|i| i.dispatched_at.is_some()));

    // Running again, ingest publishes at once.
    pngs(dir.path(), 20, 2);
    let summary = ingest::ingest_folder(&env.ctx, &env.project, dir.path(), false)
        .await
        .unwrap();
    assert_eq!((summary.new_items, summary.dispatched), (2, 2));
    assert_eq!(env.jobs(2).await, 2);
    env.teardown().await;
}

#[tokio::test]
async fn a_paused_rescore_waits_for_resume() {
    let env = ProjectEnv::start("control", |s| s.ingest.batch_size = 4).await;
    let dir = tempfile::tempdir().unwrap();
    pngs(dir.path(), 1, 3);
    ingest::ingest_folder(&env.ctx, &env.project, dir.path(), false)
        .await
        .unwrap();
    assert_eq!(env.jobs(3).await, 3);
    env.drain().await;

    // A new model while paused (the rescore after an activation) publishes
    // nothing; the items wait and resume sends them.
    dispatch::pause(&env.ctx, &env.project).await.unwrap();
    assert_eq!(
        dispatch::dispatch_pending(&env.ctx, &env.project, None)
            .await
            .unwrap(),
        0
    );
    assert_eq!(env.jobs(0).await, 0);
    assert!(env.items().await.iter().all(|i| i.dispatched_at.is_none()));
    assert_eq!(dispatch::resume(&env.ctx, &env.project).await.unwrap(), 3);
    assert_eq!(env.jobs(3).await, 3);
    env.teardown().await;
}

#[tokio::test]
async fn jobs_carry_the_priority_and_keep_to_the_rate_limit() {
    let env = ProjectEnv::start("control", |s| s.ingest.batch_size = 4).await;
    let bad_rate = ControlChange {
        rate_limit: Some(Some(0.0)),
        ..Default::default()
    };
    assert!(
        dispatch::set_control(&env.ctx.db, env.project.id, &bad_rate)
            .await
            .is_err()
    );
    let bad_priority = ControlChange {
        priority: Some(10),
        ..Default::default()
    };
    assert!(
        dispatch::set_control(&env.ctx.db, env.project.id, &bad_priority)
            .await
            .is_err()
    );

    let control = dispatch::set_control(
        &env.ctx.db,
        env.project.id,
        &ControlChange {
            rate_limit: Some(Some(20.0)),
            priority: Some(7),
            ..Default::default()
        },
    )
    .await
    .unwrap();
    assert_eq!(
        (control.paused, control.rate_limit, control.priority),
        (false, Some(20.0), 7)
    );
    assert_eq!(
        dispatch::control(&env.ctx.db, env.project.id)
            .await
            .unwrap(),
        control
    );

    let dir = tempfile::tempdir().unwrap();
    pngs(dir.path(), 1, 10);
    let started = Instant::now();
    let summary = ingest::ingest_folder(&env.ctx, &env.project, dir.path(), false)
        .await
        .unwrap();
    let took = started.elapsed();
    assert_eq!(summary.dispatched, 10);
    // 20 jobs/s in chunks of 2: the fifth chunk may not leave before 0.4 s.
    assert!(
        took >= Duration::from_millis(400),
        "10 jobs at 20/s went out in {took:?}"
    );
    assert_eq!(env.jobs(10).await, 10);
    let jobs = env.drain().await;
    assert!(jobs.iter().all(|(_, p)| *p == Some(7)), "{jobs:?}");

    // Removing the limit and the priority: no header, no pacing.
    dispatch::set_control(
        &env.ctx.db,
        env.project.id,
        &ControlChange {
            rate_limit: Some(None),
            priority: Some(0),
            ..Default::default()
        },
    )
    .await
    .unwrap();
    pngs(dir.path(), 40, 2);
    ingest::ingest_folder(&env.ctx, &env.project, dir.path(), false)
        .await
        .unwrap();
    assert_eq!(env.jobs(2).await, 2);
    assert!(env.drain().await.iter().all(|(_, p)| p.is_none()));
    env.teardown().await;
}

/// The rescore after an activation covers the items that existed when it
/// committed (ids up to the newest then), not those an ingest inserted
/// since, which that ingest published with the new model already: before,
/// a rescore walking a large project sent them all a second time.
#[tokio::test]
async fn a_rescore_sends_only_the_items_older_than_the_activation() {
    let env = ProjectEnv::start("rescore", |s| s.ingest.batch_size = 4).await;
    let dir = tempfile::tempdir().unwrap();
    pngs(dir.path(), 1, 6);
    ingest::ingest_folder(&env.ctx, &env.project, dir.path(), false)
        .await
        .unwrap();
    assert_eq!(env.jobs(6).await, 6);
    env.drain().await;

    let mut ids: Vec<Uuid> = env.items().await.iter().map(|i| i.id).collect();
    ids.sort();
    let through = ids[3];
    assert_eq!(
        dispatch::dispatch_rescore(&env.ctx, &env.project, Some(through))
            .await
            .unwrap(),
        4
    );
    assert_eq!(env.jobs(4).await, 4);
    let sent = item_ids(&env.drain().await);
    assert_eq!(sent, ids[..4].iter().copied().collect::<HashSet<_>>());

    // A project that had no item when its model was activated: nothing.
    assert_eq!(
        dispatch::dispatch_rescore(&env.ctx, &env.project, None)
            .await
            .unwrap(),
        0
    );
    assert_eq!(env.jobs(0).await, 0);
    env.teardown().await;
}

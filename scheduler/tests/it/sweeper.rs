//! The sweeper finds a quiet project's lost jobs while a busy project's
//! jobs fill the queue (issue 25 item 4).
//!
//! Before, any ready job on the prediction queue stopped the sweeper from
//! re-publishing anything already published, so one busy project held up
//! recovery for every other. Now it compares each waiting item with how
//! far jobs have come back (`dispatch_progress`): the queue is first in,
//! first out, so a job published ten sweeps before one that came back is
//! lost, whoever fills the queue meanwhile.

#![allow(clippy::unwrap_used)]

use std::collections::HashMap;
use std::time::Duration;

use chrono::Utc;
use sea_orm::{ActiveValue::Set, EntityTrait};
use sieve_scheduler::dispatch;
use sieve_scheduler::entities::item::{self, ItemState};
use sieve_scheduler::policy::Policy;
use sieve_scheduler::projects::{self, ClassNames, ProjectName};
use sieve_scheduler::routing::results;
use sieve_shared::ids::JobId;
use sieve_shared::messages::ModelArch;
use sieve_testkit::{ProjectEnv, Scored, activate_stub, insert_item};
use uuid::{NoContext, Timestamp, Uuid};

const EVERY: Duration = Duration::from_secs(60);

async fn dispatched_ago(env: &ProjectEnv, item: Uuid, ago: chrono::Duration) {
    item::Entity::update(item::ActiveModel {
        id: Set(item),
        dispatched_at: Set(Some((Utc::now() - ago).fixed_offset())),
        ..Default::default()
    })
    .exec(&env.ctx.db)
    .await
    .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_busy_project_does_not_hold_up_a_quiet_ones_recovery() {
    let env = ProjectEnv::start("busy", |_| {}).await;
    let quiet = projects::create(
        &env.ctx.db,
        &ProjectName::parse("quiet").unwrap(),
        &ClassNames::parse(&["cat".into(), "dog".into()]).unwrap(),
        &Policy::default(),
        ModelArch::SmallCnn,
        sieve_shared::kind::TaskKind::Classification,
    )
    .await
    .unwrap();
    let (quiet, _) = activate_stub(&env.ctx.db, &quiet, None).await;

    // The busy project: three jobs waiting in the queue, and a job
    // published five minutes ago that has come back.
    for n in 0..3 {
        insert_item(&env.ctx.db, &env.project, n, ItemState::Queued).await;
    }
    assert_eq!(
        dispatch::dispatch_pending(&env.ctx, &env.project, None)
            .await
            .unwrap(),
        3
    );
    let done = insert_item(&env.ctx.db, &env.project, 3, ItemState::Queued).await;
    dispatched_ago(&env, done, chrono::Duration::minutes(5)).await;
    let five_minutes_ago = (Utc::now() - chrono::Duration::minutes(5)).timestamp();
    let mut result = Scored::class(0, 0.6, 2).result(
        env.project.id,
        env.project.active_model_version_id.unwrap(),
        done,
    );
    result.job_id = JobId::from_uuid(Uuid::new_v7(Timestamp::from_unix(
        NoContext,
        five_minutes_ago as u64,
        0,
    )));
    results::apply(&env.ctx.db, &[result]).await.unwrap();

    // The quiet project: a job published twenty minutes ago, lost; one
    // published twelve minutes ago, which may still be queued behind it.
    let lost = insert_item(&env.ctx.db, &quiet, 10, ItemState::Queued).await;
    dispatched_ago(&env, lost, chrono::Duration::minutes(20)).await;
    let recent = insert_item(&env.ctx.db, &quiet, 11, ItemState::Queued).await;
    dispatched_ago(&env, recent, chrono::Duration::minutes(12)).await;

    assert_eq!(env.jobs(3).await, 3, "the busy project's jobs wait");
    dispatch::sweep_once(&env.ctx, EVERY).await;

    let mut jobs: HashMap<Uuid, usize> = HashMap::new();
    for (job, _) in env.drain().await {
        *jobs.entry(job.item_id.as_uuid()).or_default() += 1;
    }
    assert_eq!(jobs.get(&lost), Some(&1), "the lost job is published again");
    assert_eq!(
        jobs.get(&recent),
        None,
        "a job that may still wait is left alone"
    );
    assert_eq!(
        jobs.values().sum::<usize>(),
        4,
        "the busy project's three, once each"
    );
    env.teardown().await;
}

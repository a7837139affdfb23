//! Routing on the real PostgreSQL: the target-accuracy policy routes a
//! synthetic prediction set exactly as computed by hand (calibrated on the
//! randomly picked evidence only), a redelivered batch changes nothing, and
//! audit sampling holds its rate.

#![allow(clippy::unwrap_used)]

use sea_orm::{ColumnTrait, EntityTrait, PaginatorTrait, QueryFilter};
use sieve_scheduler::entities::item::{self, ItemState};
use sieve_scheduler::entities::label;
use sieve_scheduler::entities::review_task::{self, TaskReason};
use sieve_scheduler::policy::Policy;
use sieve_scheduler::projects::{self, ClassNames, Project, ProjectName};
use sieve_scheduler::routing::calibration;
use sieve_scheduler::routing::results::{self, Applied};
use sieve_shared::messages::{HoldoutEvaluation, HoldoutMetrics, ModelArch, PrelabelResult};
use sieve_testkit::{Sandbox, Scored};
use uuid::Uuid;

/// A project with an active model version whose holdout evaluation is
/// `evaluations`, calibrated for `policy`.
async fn project_with_model(
    test: &Sandbox,
    policy: Policy,
    evaluations: Vec<HoldoutEvaluation>,
) -> (Project, Uuid) {
    let project = projects::create(
        &test.db,
        &ProjectName::parse("routing").unwrap(),
        &ClassNames::parse(&["a".into(), "b".into(), "c".into()]).unwrap(),
        &policy,
        ModelArch::SmallCnn,
    )
    .await
    .unwrap();
    let metrics = HoldoutMetrics {
        holdout_size: evaluations.len() as u32,
        accuracy: None,
        // A trained version (an untrained one routes everything to review).
        train_size: 100,
        evaluations,
        base_accuracy: None,
    };
    let (_, version) = sieve_testkit::activate_stub(
        &test.db,
        &project,
        Some(serde_json::to_value(&metrics).unwrap()),
    )
    .await;
    calibration::refresh(&test.db, &policy, version, 3)
        .await
        .unwrap();
    (projects::get(&test.db, "routing").await.unwrap(), version)
}

async fn queued_item(test: &Sandbox, project: &Project, n: usize) -> Uuid {
    sieve_testkit::insert_item(&test.db, project, n, ItemState::Queued).await
}

fn result(
    project: &Project,
    version: Uuid,
    item: Uuid,
    class: u32,
    confidence: f32,
    disagreement: f32,
) -> PrelabelResult {
    Scored::class(class, confidence, 3)
        .disagreement(disagreement)
        .result(project.id, version, item)
}

#[tokio::test]
async fn target_accuracy_routes_as_computed_by_hand() {
    let test = Sandbox::start(|s| s.database.max_connections = 20).await;
    // The hand-worked evidence of calibration.rs: class 0 has 200 holdout
    // predictions, the 150 most confident (0.999 .. 0.850) all right, then
    // alternating; class 1 has 20, all right — too few for 0.97 at 95%.
    let mut evidence = Vec::new();
    for i in 0..200u32 {
        let correct = i < 150 || i % 2 == 1;
        evidence.push(HoldoutEvaluation {
            label: if correct { 0 } else { 2 },
            predicted: 0,
            confidence: 1.0 - (i + 1) as f32 / 1000.0,
            random: Some(true),
        });
    }
    for i in 0..20u32 {
        evidence.push(HoldoutEvaluation {
            label: 1,
            predicted: 1,
            confidence: 0.99 - i as f32 / 100.0,
            random: Some(true),
        });
    }
    // Items active learning picked (for being hard) are no evidence: were
    // these 100 confident mistakes counted, class 0 would get no threshold.
    for _ in 0..100 {
        evidence.push(HoldoutEvaluation {
            label: 2,
            predicted: 0,
            confidence: 0.9999,
            random: Some(false),
        });
    }
    let policy = Policy {
        target_accuracy: Some(0.97),
        audit_rate: 0.0,
        ..Policy::default()
    };
    let (project, version) = project_with_model(&test, policy, evidence).await;
    let stored = calibration::load(&test.db, version).await.unwrap().unwrap();
    assert!(
        (stored.thresholds[0].unwrap() - 0.85).abs() < 1e-6,
        "{stored:?}"
    );
    assert_eq!(stored.thresholds[1], None);

    let cases = [
        (0, 0.86, 0.0, Applied::MachineLabeled), // above class 0's threshold
        (0, 0.85, 0.0, Applied::MachineLabeled), // at it
        (0, 0.84, 0.0, Applied::SentToReview),   // below it
        (1, 0.999, 0.0, Applied::SentToReview),  // class 1 lacks evidence
        (2, 0.999, 0.0, Applied::SentToReview),  // class 2 has none at all
        (0, 0.95, 0.67, Applied::SentToReview),  // committee disagrees
    ];
    let mut batch = Vec::new();
    for (n, (class, confidence, disagreement, _)) in cases.iter().enumerate() {
        let item = queued_item(&test, &project, n).await;
        batch.push(result(
            &project,
            version,
            item,
            *class,
            *confidence,
            *disagreement,
        ));
    }
    let outcomes = results::apply(&test.db, &batch).await.unwrap();
    let expected: Vec<Applied> = cases.iter().map(|c| c.3).collect();
    assert_eq!(outcomes, expected);
    let reasons: Vec<TaskReason> = review_task::Entity::find()
        .all(&test.db)
        .await
        .unwrap()
        .into_iter()
        .map(|t| t.reason)
        .collect();
    assert_eq!(
        reasons
            .iter()
            .filter(|r| **r == TaskReason::Disagreement)
            .count(),
        1
    );
    assert_eq!(
        reasons
            .iter()
            .filter(|r| **r == TaskReason::LowConfidence)
            .count(),
        3
    );

    // Redelivered: nothing changes.
    let again = results::apply(&test.db, &batch).await.unwrap();
    assert!(again.iter().all(|o| *o == Applied::Duplicate), "{again:?}");
    assert_eq!(label::Entity::find().count(&test.db).await.unwrap(), 2);
    assert_eq!(
        review_task::Entity::find().count(&test.db).await.unwrap(),
        4
    );
    drop(test);
}

#[tokio::test]
async fn audit_sampling_holds_its_rate() {
    let test = Sandbox::start(|s| s.database.max_connections = 20).await;
    let policy = Policy {
        confidence_threshold: 0.5,
        audit_rate: 0.1,
        ..Policy::default()
    };
    let (project, version) = project_with_model(&test, policy, Vec::new()).await;
    let n = 2000;
    let mut batch = Vec::with_capacity(n);
    for i in 0..n {
        let item = queued_item(&test, &project, i).await;
        batch.push(result(&project, version, item, 0, 0.9, 0.0));
    }
    for chunk in batch.chunks(200) {
        results::apply(&test.db, chunk).await.unwrap();
    }
    let audits = review_task::Entity::find()
        .filter(review_task::Column::Reason.eq(TaskReason::Audit))
        .count(&test.db)
        .await
        .unwrap();
    let samples = review_task::Entity::find()
        .filter(review_task::Column::Reason.eq(TaskReason::Sample))
        .count(&test.db)
        .await
        .unwrap();
    let machine = item::Entity::find()
        .filter(item::Column::State.eq(ItemState::AutoLabeled))
        .count(&test.db)
        .await
        .unwrap();
    // Audits: Binomial(2000, 0.1), mean 200, sd 13.4; four sd either side.
    // The calibration sample, an independent draw, takes 10% of the rest:
    // Binomial(2000, 0.09), mean 180, sd 12.8.
    println!("audits: {audits} of {n} (expected 200 ± 54); samples: {samples} (180 ± 51)");
    assert!((146..=254).contains(&audits), "{audits}");
    assert!((129..=231).contains(&samples), "{samples}");
    assert_eq!(
        audits + samples + machine,
        n as u64,
        "every confident item is machine-labeled, audited or in the sample"
    );
    drop(test);
}

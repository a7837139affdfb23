//! Routing on the real PostgreSQL: the target-accuracy policy routes a
//! synthetic prediction set exactly as computed by hand (calibrated on the
//! randomly picked evidence only), a redelivered batch changes nothing, and
//! audit sampling holds its rate; a box project's precision and recall
//! targets raise its threshold above images with false or missed boxes; one
//! batch holding every kind of result, some for the same item twice, is
//! routed as each result would be in turn.

#![allow(clippy::unwrap_used)]

use sea_orm::{ColumnTrait, EntityTrait, PaginatorTrait, QueryFilter};
use sieve_scheduler::entities::item::{self, ItemState};
use sieve_scheduler::entities::label;
use sieve_scheduler::entities::review_task::{self, TaskReason, TaskState};
use sieve_scheduler::entities::{prediction, project as project_entity};
use sieve_scheduler::policy::{Policy, PolicyPatch};
use sieve_scheduler::projects::{self, ClassNames, Project, ProjectName};
use sieve_scheduler::routing::results::{self, Applied};
use sieve_scheduler::routing::{calibration, reroute};
use sieve_shared::box_scores::BoxTally;
use sieve_shared::kind::TaskKind;
use sieve_shared::messages::{
    HoldoutEvaluation, HoldoutMetrics, ModelArch, PrelabelOutcome, PrelabelResult,
};
use sieve_testkit::{Sandbox, Scored, StubVersion};
use uuid::Uuid;

/// Project "routing", classes a, b and c, under `policy`.
async fn routing_project(test: &Sandbox, policy: &Policy) -> Project {
    projects::create(
        &test.db,
        &ProjectName::parse("routing").unwrap(),
        &ClassNames::parse(&["a".into(), "b".into(), "c".into()]).unwrap(),
        policy,
        ModelArch::SmallCnn,
        sieve_shared::kind::TaskKind::Classification,
    )
    .await
    .unwrap()
}

/// A project with an active model version whose holdout evaluation is
/// `evaluations`, calibrated for `policy`.
async fn project_with_model(
    test: &Sandbox,
    policy: Policy,
    evaluations: Vec<HoldoutEvaluation>,
) -> (Project, Uuid) {
    let project = routing_project(test, &policy).await;
    let metrics = HoldoutMetrics {
        holdout_size: evaluations.len() as u32,
        accuracy: None,
        // A trained version (an untrained one routes everything to review).
        train_size: 100,
        evaluations,
        base_accuracy: None,
        average_precision: None,
        paired: None,
    };
    let (_, version) =
        sieve_testkit::activate_stub(&test.db, &project, Some(trained(&metrics))).await;
    calibration::refresh(&test.db, &policy, version, 3)
        .await
        .unwrap();
    (projects::get(&test.db, "routing").await.unwrap(), version)
}

/// A trained version's metrics as stored.
fn trained(metrics: &HoldoutMetrics) -> serde_json::Value {
    serde_json::to_value(metrics).unwrap()
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
            correct: None,
            boxes: None,
        });
    }
    for i in 0..20u32 {
        evidence.push(HoldoutEvaluation {
            label: 1,
            predicted: 1,
            confidence: 0.99 - i as f32 / 100.0,
            random: Some(true),
            correct: None,
            boxes: None,
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
            correct: None,
            boxes: None,
        });
    }
    let policy = Policy {
        target_accuracy: Some(0.97),
        audit_rate: 0.0,
        // Each class on its own evidence, as worked by hand.
        pool_evidence: false,
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

/// `n` random checks the active version was calibrated on, all right and
/// confident: short of what 0.97 needs when `n` < 125.
fn random_checks(n: u32) -> Vec<HoldoutEvaluation> {
    (0..n)
        .map(|i| HoldoutEvaluation {
            label: i % 3,
            predicted: i % 3,
            confidence: 0.99,
            random: Some(true),
            correct: None,
            boxes: None,
        })
        .collect()
}

#[tokio::test]
async fn a_gate_shut_for_want_of_evidence_asks_for_random_checks_first() {
    let test = Sandbox::start(|s| s.database.max_connections = 20).await;
    let policy = Policy {
        target_accuracy: Some(0.97),
        ..Policy::default()
    };
    assert!(policy.pool_evidence, "pooling is the default");
    let project = routing_project(&test, &policy).await;
    let n = 2000;
    let mut items = Vec::with_capacity(n);
    for i in 0..n {
        items.push(queued_item(&test, &project, i).await);
    }
    // Calibrated on 60 random checks: the gate is shut, and the version
    // asks for 3 × 125 − 60 = 315 more among the 2,000 unlabeled items: a
    // sample rate of 0.02 + 315 / 2000 = 0.1775.
    let metrics = HoldoutMetrics {
        holdout_size: 60,
        accuracy: None,
        train_size: 100,
        evaluations: random_checks(60),
        base_accuracy: None,
        average_precision: None,
        paired: None,
    };
    let (_, version) =
        sieve_testkit::activate_stub(&test.db, &project, Some(trained(&metrics))).await;
    let stored = calibration::refresh(&test.db, &policy, version, 3)
        .await
        .unwrap()
        .unwrap();
    assert!(!stored.is_open());
    assert!(
        (stored.sample_rate.unwrap() - 0.1775).abs() < 1e-9,
        "{stored:?}"
    );
    let project = projects::get(&test.db, "routing").await.unwrap();
    // The model is sure of everything; without evidence it labels nothing.
    let batch: Vec<PrelabelResult> = items
        .iter()
        .map(|&item| result(&project, version, item, 0, 0.99, 0.0))
        .collect();
    for chunk in batch.chunks(250) {
        results::apply(&test.db, chunk).await.unwrap();
    }
    let tasks = review_task::Entity::find().all(&test.db).await.unwrap();
    assert_eq!(tasks.len(), n, "a shut gate sends every item to review");
    let samples: Vec<_> = tasks
        .iter()
        .filter(|t| t.reason == TaskReason::Sample)
        .collect();
    // Binomial(2000, 0.1775): mean 355, sd 17; four sd either side. At the
    // audit rate alone it would be 40.
    println!("random checks asked: {} (expected 355 ± 68)", samples.len());
    assert!((287..=423).contains(&samples.len()), "{}", samples.len());
    assert!(
        samples
            .iter()
            .all(|t| t.priority == sieve_scheduler::policy::AUDIT_PRIORITY),
        "random checks come first"
    );
    assert!(
        tasks
            .iter()
            .filter(|t| t.reason != TaskReason::Sample)
            .all(|t| t.reason == TaskReason::LowConfidence && t.priority < 3.0)
    );
    // The first claim is a random check.
    let first = sieve_scheduler::review::claim_next(
        &test.db,
        &project,
        "ann",
        std::time::Duration::from_secs(60),
    )
    .await
    .unwrap()
    .unwrap();
    assert_eq!(first.reason, TaskReason::Sample);

    // Enough evidence opens the gate, and the sampling falls back to the
    // audit rate.
    let metrics = HoldoutMetrics {
        evaluations: random_checks(400),
        ..metrics
    };
    let next = sieve_testkit::StubVersion {
        number: 2,
        status: sieve_scheduler::entities::model_version::VersionStatus::Candidate,
        metrics: Some(serde_json::to_value(&metrics).unwrap()),
        ..sieve_testkit::StubVersion::active()
    }
    .insert(&test.db, project.id.as_uuid())
    .await;
    let open = calibration::refresh(&test.db, &policy, next, 3)
        .await
        .unwrap()
        .unwrap();
    assert!(open.is_open());
    assert_eq!(open.sample_rate, None);
    drop(test);
}

#[tokio::test]
async fn a_policy_change_reroutes_what_waits_for_review() {
    let test = Sandbox::start(|s| s.database.max_connections = 20).await;
    let policy = Policy {
        confidence_threshold: 0.9,
        audit_rate: 0.0,
        ..Policy::default()
    };
    let (project, version) = project_with_model(&test, policy, Vec::new()).await;
    // Twelve items at 0.8: all below 0.9, all in review.
    let mut batch = Vec::new();
    for i in 0..12 {
        let item = queued_item(&test, &project, i).await;
        batch.push(result(&project, version, item, 1, 0.8, 0.0));
    }
    let outcomes = results::apply(&test.db, &batch).await.unwrap();
    assert!(outcomes.iter().all(|o| *o == Applied::SentToReview));
    // One is in a reviewer's hands: it stays there.
    let held = sieve_scheduler::review::claim_next(
        &test.db,
        &project,
        "ann",
        std::time::Duration::from_secs(60),
    )
    .await
    .unwrap()
    .unwrap();

    // Lowering the threshold to 0.75 labels the other eleven by machine at
    // once, from the stored predictions.
    let lower = sieve_scheduler::policy::PolicyPatch {
        confidence_threshold: Some(0.75),
        ..Default::default()
    };
    let project = calibration::patch_policy(&test.db, &project, &lower)
        .await
        .unwrap();
    let done = reroute::reroute(&test.db, project.id.as_uuid())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        (done.machine_labeled, done.review, done.kept),
        (11, 0, 1),
        "{done:?}"
    );
    assert_eq!(done.policy_version, project.policy_version);
    let states = item::Entity::find().all(&test.db).await.unwrap();
    assert_eq!(
        states
            .iter()
            .filter(|i| i.state == ItemState::AutoLabeled)
            .count(),
        11
    );
    let still = item::Entity::find_by_id(held.item_id)
        .one(&test.db)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(still.state, ItemState::InReview, "the claimed one stays");
    let machine = label::Entity::find()
        .filter(label::Column::Source.eq(label::LabelSource::Machine))
        .all(&test.db)
        .await
        .unwrap();
    assert_eq!(machine.len(), 11, "one machine label each");
    assert!(machine.iter().all(|l| l.class_index == Some(1)));
    // Nothing waits under an older policy now: a second pass changes nothing.
    let again = reroute::reroute(&test.db, project.id.as_uuid())
        .await
        .unwrap()
        .unwrap();
    assert_eq!((again.machine_labeled, again.review, again.kept), (0, 0, 0));

    // A change whose pass never ran (the scheduler stopped): the sweep
    // finds the project lagging and re-routes it. The held task was
    // released meanwhile; raising the threshold keeps it in review.
    sieve_scheduler::review::release(
        &test.db,
        sieve_shared::ids::TaskId::from_uuid(held.task_id),
        "ann",
        held.fencing_token,
    )
    .await
    .unwrap();
    let higher = sieve_scheduler::policy::PolicyPatch {
        confidence_threshold: Some(0.95),
        ..Default::default()
    };
    let project = calibration::patch_policy(&test.db, &project, &higher)
        .await
        .unwrap();
    reroute::sweep(&test.db).await.unwrap();
    let routed = sieve_scheduler::entities::prediction::Entity::find()
        .filter(sieve_scheduler::entities::prediction::Column::ItemId.eq(held.item_id))
        .one(&test.db)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(routed.policy_version, Some(project.policy_version));
    assert_eq!(routed.routed_to.as_deref(), Some("review"));
    // And the other eleven keep their machine labels: only what waits moves.
    assert_eq!(
        label::Entity::find()
            .filter(label::Column::Source.eq(label::LabelSource::Machine))
            .count(&test.db)
            .await
            .unwrap(),
        11
    );
    drop(test);
}

/// A holdout of 200 random checks of a detector, none missing a box: the
/// 120 surest images propose 3 boxes, all right, the 80 below a false
/// fourth each.
fn boxed_evidence() -> Vec<HoldoutEvaluation> {
    (0..200u32)
        .map(|i| HoldoutEvaluation {
            label: 0,
            predicted: 0,
            confidence: 1.0 - (i + 1) as f32 / 1000.0,
            random: Some(true),
            correct: Some(true),
            boxes: Some(BoxTally {
                proposed: if i < 120 { 3 } else { 4 },
                right: 3,
                truth: 3,
            }),
        })
        .collect()
}

#[tokio::test]
async fn box_targets_hold_back_images_with_false_or_missed_boxes() {
    let test = Sandbox::start(|_| {}).await;
    let trees = projects::create(
        &test.db,
        &ProjectName::parse("trees").unwrap(),
        &ClassNames::parse_for(TaskKind::Detection, &["tree".into()]).unwrap(),
        &Policy::default(),
        ModelArch::Detector,
        TaskKind::Detection,
    )
    .await
    .unwrap();
    let evaluations = boxed_evidence();
    let metrics = HoldoutMetrics {
        holdout_size: 200,
        train_size: 100,
        evaluations: evaluations.clone(),
        ..HoldoutMetrics::default()
    };
    let (trees, version) = sieve_testkit::activate_stub(
        &test.db,
        &trees,
        Some(serde_json::to_value(&metrics).unwrap()),
    )
    .await;
    let threshold = |project: &Project, calibration: &calibration::Calibration| {
        calibration::threshold_for(&project.policy, 0, Some(calibration))
    };

    // The image target alone: every image is right, the gate opens at the
    // least sure of them.
    let images = PolicyPatch {
        target_accuracy: Some(Some(0.95)),
        ..PolicyPatch::default()
    };
    let trees = calibration::patch_policy(&test.db, &trees, &images)
        .await
        .unwrap();
    let stored = calibration::load(&test.db, version).await.unwrap().unwrap();
    let lowest = evaluations[199].confidence;
    assert_eq!(threshold(&trees, &stored), Some(lowest));

    // With a precision target the threshold rises above the images whose
    // false boxes would pull the boxes' precision under it, and is stored
    // for that policy.
    let boxes = PolicyPatch {
        target_precision: Some(Some(0.95)),
        ..PolicyPatch::default()
    };
    let trees = calibration::patch_policy(&test.db, &trees, &boxes)
        .await
        .unwrap();
    assert_eq!(trees.policy.target_precision, Some(0.95));
    let stored = calibration::load(&test.db, version).await.unwrap().unwrap();
    let raised = threshold(&trees, &stored).expect("the surest boxes are right");
    assert!(
        raised > lowest && raised < evaluations[119].confidence,
        "{raised}"
    );
    let admitted = evaluations.iter().filter(|e| e.confidence >= raised);
    let (proposed, right) = admitted.fold((0u64, 0u64), |(p, r), e| {
        let tally = e.boxes.unwrap();
        (p + u64::from(tally.proposed), r + u64::from(tally.right))
    });
    let (bound, _) = calibration::wilson(right, proposed, calibration::z_for(0.95));
    assert!(bound >= 0.95, "{right}/{proposed}: {bound}");

    // Dropping it puts the image target's threshold back.
    let drop_it = PolicyPatch {
        target_precision: Some(None),
        ..PolicyPatch::default()
    };
    let trees = calibration::patch_policy(&test.db, &trees, &drop_it)
        .await
        .unwrap();
    let stored = calibration::load(&test.db, version).await.unwrap().unwrap();
    assert_eq!(threshold(&trees, &stored), Some(lowest));

    // A recall target: every box people drew is found, but 600 boxes
    // cannot show 99.9% as a lower bound, so the gate shuts; 99% they can.
    let strict_recall = PolicyPatch {
        target_recall: Some(Some(0.999)),
        ..PolicyPatch::default()
    };
    let trees = calibration::patch_policy(&test.db, &trees, &strict_recall)
        .await
        .unwrap();
    let stored = calibration::load(&test.db, version).await.unwrap().unwrap();
    assert_eq!(threshold(&trees, &stored), None);
    let recall = PolicyPatch {
        target_recall: Some(Some(0.99)),
        ..PolicyPatch::default()
    };
    let trees = calibration::patch_policy(&test.db, &trees, &recall)
        .await
        .unwrap();
    let stored = calibration::load(&test.db, version).await.unwrap().unwrap();
    assert_eq!(threshold(&trees, &stored), Some(lowest));

    // A classification project has no boxes to hold to it.
    let (shirts, _) = project_with_model(&test, Policy::default(), Vec::new()).await;
    let refused = calibration::patch_policy(
        &test.db,
        &shirts,
        &PolicyPatch {
            target_accuracy: Some(Some(0.95)),
            target_precision: Some(Some(0.95)),
            ..PolicyPatch::default()
        },
    )
    .await
    .unwrap_err();
    assert!(
        refused
            .to_string()
            .contains("a classification project has none"),
        "{refused}"
    );
    drop(test);
}

/// Version 2 of `project`, trained and made active; version 1 retired.
async fn activate_second(test: &Sandbox, project: &Project) -> Uuid {
    use sieve_scheduler::entities::model_version::{self, VersionStatus};
    model_version::Entity::update_many()
        .col_expr(
            model_version::Column::Status,
            sea_orm::sea_query::Expr::value(VersionStatus::Retired),
        )
        .filter(model_version::Column::ProjectId.eq(project.id.as_uuid()))
        .exec(&test.db)
        .await
        .unwrap();
    let metrics = HoldoutMetrics {
        holdout_size: 0,
        accuracy: None,
        train_size: 100,
        evaluations: Vec::new(),
        base_accuracy: None,
        average_precision: None,
        paired: None,
    };
    let version = StubVersion {
        number: 2,
        metrics: Some(trained(&metrics)),
        ..StubVersion::active()
    }
    .insert(&test.db, project.id.as_uuid())
    .await;
    project_entity::Entity::update(project_entity::ActiveModel {
        id: sea_orm::ActiveValue::Set(project.id.as_uuid()),
        active_model_version_id: sea_orm::ActiveValue::Set(Some(version)),
        ..Default::default()
    })
    .exec(&test.db)
    .await
    .unwrap();
    version
}

#[tokio::test]
async fn a_mixed_batch_is_routed_as_each_result_in_turn() {
    let test = Sandbox::start(|_| {}).await;
    // A fixed threshold of 0.9, nothing audited: every route is known.
    let policy = Policy {
        confidence_threshold: 0.9,
        audit_rate: 0.0,
        ..Policy::default()
    };
    let (project, first) = project_with_model(&test, policy, Vec::new()).await;
    let [
        sure,
        unsure,
        reviewed,
        shifting,
        twice,
        repeated,
        failing,
        failed_first,
    ] = {
        let mut items = Vec::new();
        for n in 0..8 {
            items.push(queued_item(&test, &project, n).await);
        }
        <[Uuid; 8]>::try_from(items).unwrap()
    };
    // Two items wait for review under version 1.
    let waiting = results::apply(
        &test.db,
        &[
            result(&project, first, reviewed, 0, 0.5, 0.0),
            result(&project, first, shifting, 0, 0.5, 0.0),
        ],
    )
    .await
    .unwrap();
    assert_eq!(waiting, [Applied::SentToReview, Applied::SentToReview]);
    let task_of = |item: Uuid| {
        review_task::Entity::find()
            .filter(review_task::Column::ItemId.eq(item))
            .one(&test.db)
    };
    let reviewed_task = task_of(reviewed).await.unwrap().unwrap();
    let shifting_task = task_of(shifting).await.unwrap().unwrap();

    let second = activate_second(&test, &project).await;
    let project = projects::get(&test.db, "routing").await.unwrap();
    let failure = |item: Uuid| {
        let mut failed = result(&project, second, item, 0, 0.99, 0.0);
        failed.outcome = PrelabelOutcome::Failed {
            reason: "undecodable image".into(),
        };
        failed
    };
    let unknown = result(&project, second, Uuid::now_v7(), 0, 0.99, 0.0);
    let batch = [
        result(&project, second, sure, 1, 0.99, 0.0),
        result(&project, second, unsure, 1, 0.5, 0.0),
        result(&project, second, reviewed, 2, 0.99, 0.0),
        result(&project, second, shifting, 2, 0.6, 0.0),
        // By the retired version, then by the active one: the second turn.
        result(&project, first, twice, 0, 0.99, 0.0),
        result(&project, second, twice, 2, 0.95, 0.0),
        // The same prediction delivered twice in one batch.
        result(&project, second, repeated, 0, 0.5, 0.0),
        result(&project, second, repeated, 0, 0.5, 0.0),
        failure(failing),
        unknown,
        // Failed, then scored: the second sees a failed item and keeps it.
        failure(failed_first),
        result(&project, second, failed_first, 0, 0.99, 0.0),
    ];
    let outcomes = results::apply(&test.db, &batch).await.unwrap();
    assert_eq!(
        outcomes,
        [
            Applied::MachineLabeled,
            Applied::SentToReview,
            Applied::MachineLabeled,
            Applied::SentToReview,
            Applied::Kept,
            Applied::MachineLabeled,
            Applied::SentToReview,
            Applied::Duplicate,
            Applied::Failed,
            Applied::UnknownItem,
            Applied::Failed,
            Applied::Kept,
        ]
    );

    let db = &test.db;
    let state = |item: Uuid| async move {
        item::Entity::find_by_id(item)
            .one(db)
            .await
            .unwrap()
            .unwrap()
            .state
    };
    assert_eq!(state(sure).await, ItemState::AutoLabeled);
    assert_eq!(state(unsure).await, ItemState::InReview);
    assert_eq!(state(reviewed).await, ItemState::AutoLabeled);
    assert_eq!(state(shifting).await, ItemState::InReview);
    assert_eq!(state(twice).await, ItemState::AutoLabeled);
    assert_eq!(state(repeated).await, ItemState::InReview);
    assert_eq!(state(failing).await, ItemState::Failed);
    assert_eq!(state(failed_first).await, ItemState::Failed);

    // Machine labels carry the class and the version that gave them.
    let labels = label::Entity::find().all(&test.db).await.unwrap();
    let class_of = |item: Uuid| {
        let mine: Vec<_> = labels.iter().filter(|l| l.item_id == item).collect();
        assert_eq!(mine.len(), 1, "one label for {item}: {labels:?}");
        assert_eq!(mine[0].model_version_id, Some(second));
        mine[0].class_index
    };
    assert_eq!(class_of(sure), Some(1));
    assert_eq!(class_of(reviewed), Some(2));
    assert_eq!(class_of(twice), Some(2));
    assert_eq!(labels.len(), 3);

    // The sure model cancelled one task and re-prioritised the other.
    let task = |id: Uuid| async move {
        review_task::Entity::find_by_id(id)
            .one(db)
            .await
            .unwrap()
            .unwrap()
    };
    let reviewed_after = task(reviewed_task.id).await;
    assert_eq!(reviewed_after.state, TaskState::Cancelled);
    assert!(reviewed_after.closed_at.is_some());
    let shifting_after = task(shifting_task.id).await;
    assert_eq!(shifting_after.state, TaskState::Open);
    assert!(
        (shifting_after.priority - 0.4).abs() < 1e-6,
        "{shifting_after:?}"
    );
    let shifting_prediction = prediction::Entity::find()
        .filter(prediction::Column::ItemId.eq(shifting))
        .filter(prediction::Column::ModelVersionId.eq(second))
        .one(&test.db)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(shifting_after.prediction_id, Some(shifting_prediction.id));
    // One open task each for the items in review, none for the others.
    let open: Vec<Uuid> = review_task::Entity::find()
        .filter(review_task::Column::State.eq(TaskState::Open))
        .all(&test.db)
        .await
        .unwrap()
        .into_iter()
        .map(|t| t.item_id)
        .collect();
    let mut expected_open = vec![unsure, shifting, repeated];
    expected_open.sort();
    let mut open_sorted = open.clone();
    open_sorted.sort();
    assert_eq!(open_sorted, expected_open);

    // Every stored prediction says where it went, under the policy's version.
    let routed: Vec<(Uuid, Uuid, Option<String>, Option<i32>)> = prediction::Entity::find()
        .all(&test.db)
        .await
        .unwrap()
        .into_iter()
        .map(|p| (p.item_id, p.model_version_id, p.routed_to, p.policy_version))
        .collect();
    let route_of = |item: Uuid, version: Uuid| {
        let found: Vec<_> = routed
            .iter()
            .filter(|r| r.0 == item && r.1 == version)
            .collect();
        assert_eq!(found.len(), 1, "{item} by {version}: {routed:?}");
        assert_eq!(found[0].3, Some(project.policy_version));
        found[0].2.clone().unwrap()
    };
    assert_eq!(route_of(twice, first), "kept");
    assert_eq!(route_of(twice, second), "auto_labeled");
    assert_eq!(route_of(repeated, second), "review");
    assert_eq!(route_of(reviewed, second), "auto_labeled");
    assert_eq!(route_of(failed_first, second), "kept");
    // Ten predictions: two by version 1 before, eight stored now (the
    // repeat, the failures and the unknown item store none).
    assert_eq!(routed.len(), 10);
    drop(test);
}

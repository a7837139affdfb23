//! The initial schema (DESIGN §5).
//!
//! Written as SQL rather than through the schema builder: the constraints
//! that carry the invariants (one item per content hash, one prediction per
//! item and version, one open review task per item, one active training run
//! per project) read best as what PostgreSQL will enforce.

use sea_orm_migration::prelude::*;

pub struct Migration;

impl MigrationName for Migration {
    fn name(&self) -> &str {
        "m20261125_000001_initial"
    }
}

const UP: &str = r#"
CREATE TABLE projects (
    id uuid PRIMARY KEY,
    name text NOT NULL UNIQUE,
    task_kind text NOT NULL DEFAULT 'classification' CHECK (task_kind IN ('classification')),
    class_names jsonb NOT NULL,
    policy jsonb NOT NULL,
    policy_version integer NOT NULL DEFAULT 1,
    active_model_version_id uuid,
    created_at timestamptz NOT NULL DEFAULT now(),
    updated_at timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE training_runs (
    id uuid PRIMARY KEY,
    project_id uuid NOT NULL REFERENCES projects (id) ON DELETE CASCADE,
    requested_by text NOT NULL,
    base_version_id uuid,
    model_version_id uuid NOT NULL,
    params jsonb NOT NULL,
    snapshot_key text NOT NULL,
    label_count integer NOT NULL,
    state text NOT NULL CHECK (state IN ('queued', 'running', 'succeeded', 'failed', 'cancelled')),
    progress jsonb,
    error text,
    created_at timestamptz NOT NULL DEFAULT now(),
    updated_at timestamptz NOT NULL DEFAULT now(),
    finished_at timestamptz
);
-- At most one run at a time per project.
CREATE UNIQUE INDEX training_runs_one_active ON training_runs (project_id)
    WHERE state IN ('queued', 'running');

CREATE TABLE model_versions (
    id uuid PRIMARY KEY,
    project_id uuid NOT NULL REFERENCES projects (id) ON DELETE CASCADE,
    version integer NOT NULL,
    parent_id uuid REFERENCES model_versions (id),
    training_run_id uuid REFERENCES training_runs (id),
    artifact_key text,
    checksum text,
    architecture jsonb,
    metrics jsonb,
    status text NOT NULL CHECK (status IN ('training', 'candidate', 'active', 'retired', 'failed')),
    status_reason text,
    created_at timestamptz NOT NULL DEFAULT now(),
    activated_at timestamptz,
    UNIQUE (project_id, version)
);
-- At most one active version per project.
CREATE UNIQUE INDEX model_versions_one_active ON model_versions (project_id)
    WHERE status = 'active';

ALTER TABLE projects ADD CONSTRAINT projects_active_model_fk
    FOREIGN KEY (active_model_version_id) REFERENCES model_versions (id);

CREATE TABLE items (
    id uuid PRIMARY KEY,
    project_id uuid NOT NULL REFERENCES projects (id) ON DELETE CASCADE,
    object_key text NOT NULL,
    source text NOT NULL,
    content_hash text NOT NULL,
    size_bytes bigint NOT NULL,
    width integer,
    height integer,
    state text NOT NULL CHECK (state IN ('queued', 'in_review', 'auto_labeled', 'human_labeled', 'failed')),
    attempts integer NOT NULL DEFAULT 0,
    last_error text,
    dispatched_at timestamptz,
    created_at timestamptz NOT NULL DEFAULT now(),
    updated_at timestamptz NOT NULL DEFAULT now(),
    UNIQUE (project_id, content_hash)
);
CREATE INDEX items_project_state ON items (project_id, state);

CREATE TABLE predictions (
    id uuid PRIMARY KEY,
    item_id uuid NOT NULL REFERENCES items (id) ON DELETE CASCADE,
    model_version_id uuid NOT NULL REFERENCES model_versions (id),
    job_id uuid NOT NULL,
    worker_id text NOT NULL,
    probabilities jsonb NOT NULL,
    member_votes jsonb NOT NULL,
    top_class integer NOT NULL,
    confidence real NOT NULL,
    margin real NOT NULL,
    entropy real NOT NULL,
    disagreement real NOT NULL,
    mutual_information real NOT NULL,
    embedding jsonb,
    routed_to text CHECK (routed_to IN ('auto_labeled', 'review', 'kept')),
    policy_version integer,
    created_at timestamptz NOT NULL DEFAULT now(),
    UNIQUE (item_id, model_version_id)
);

CREATE TABLE review_tasks (
    id uuid PRIMARY KEY,
    project_id uuid NOT NULL REFERENCES projects (id) ON DELETE CASCADE,
    item_id uuid NOT NULL REFERENCES items (id) ON DELETE CASCADE,
    prediction_id uuid REFERENCES predictions (id),
    reason text NOT NULL CHECK (reason IN ('low_confidence', 'disagreement', 'audit', 'seed')),
    priority real NOT NULL,
    state text NOT NULL CHECK (state IN ('open', 'claimed', 'done', 'cancelled')),
    lease_holder text,
    lease_expires_at timestamptz,
    fencing_token bigint NOT NULL DEFAULT 0,
    created_at timestamptz NOT NULL DEFAULT now(),
    updated_at timestamptz NOT NULL DEFAULT now(),
    closed_at timestamptz
);
-- One open task per item: a redelivered result cannot open a second.
CREATE UNIQUE INDEX review_tasks_one_open_per_item ON review_tasks (item_id)
    WHERE state IN ('open', 'claimed');
CREATE INDEX review_tasks_queue ON review_tasks (project_id, priority DESC, created_at)
    WHERE state IN ('open', 'claimed');

CREATE TABLE labels (
    id uuid PRIMARY KEY,
    item_id uuid NOT NULL REFERENCES items (id) ON DELETE CASCADE,
    class_index integer NOT NULL,
    source text NOT NULL CHECK (source IN ('human', 'machine', 'import')),
    reviewer text,
    prediction_id uuid REFERENCES predictions (id),
    model_version_id uuid REFERENCES model_versions (id),
    review_task_id uuid REFERENCES review_tasks (id),
    created_at timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX labels_item ON labels (item_id, created_at DESC);
-- A review task yields at most one human label, however often it is submitted.
CREATE UNIQUE INDEX labels_one_per_task ON labels (review_task_id) WHERE review_task_id IS NOT NULL;

CREATE TABLE api_tokens (
    id uuid PRIMARY KEY,
    name text NOT NULL,
    token_hash text NOT NULL UNIQUE,
    role text NOT NULL CHECK (role IN ('reviewer', 'ml', 'ops', 'admin')),
    created_at timestamptz NOT NULL DEFAULT now(),
    expires_at timestamptz,
    revoked_at timestamptz
);
"#;

const DOWN: &str = r#"
DROP TABLE IF EXISTS api_tokens, labels, review_tasks, predictions, items CASCADE;
ALTER TABLE IF EXISTS projects DROP CONSTRAINT IF EXISTS projects_active_model_fk;
DROP TABLE IF EXISTS model_versions, training_runs, projects CASCADE;
"#;

#[async_trait::async_trait]
impl MigrationTrait for Migration {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager.get_connection().execute_unprepared(UP).await?;
        Ok(())
    }

    async fn down(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager.get_connection().execute_unprepared(DOWN).await?;
        Ok(())
    }
}

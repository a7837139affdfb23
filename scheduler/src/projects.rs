//! Projects: a name, a class list, a routing policy and the architecture
//! its models are built on.
//!
//! Names and class lists are validated here, at the edge; everything past
//! [`ProjectName::parse`] and [`ClassNames::parse`] can trust them. The
//! architecture is chosen once, at creation: every training run of the
//! project asks for it ([`Project::train_params`]), so a project's versions
//! stay comparable and can replace one another.

use chrono::Utc;
use sea_orm::{ActiveValue::Set, ColumnTrait, DatabaseConnection, EntityTrait, QueryFilter};
use serde::Serialize;
use sieve_shared::ids::ProjectId;
use sieve_shared::kind::TaskKind;
use sieve_shared::messages::{ModelArch, TrainParams};
use uuid::Uuid;

use crate::box_settings::{BoxSettings, BoxSettingsChange, InForce};
use crate::entities::project;
use crate::error::{AppError, AppResult};
use crate::policy::Policy;

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ProjectName(String);

impl ProjectName {
    pub fn parse(raw: &str) -> AppResult<Self> {
        let ok = !raw.is_empty()
            && raw.len() <= 64
            && raw.starts_with(|c: char| c.is_ascii_alphanumeric())
            && raw
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_');
        if ok {
            Ok(Self(raw.to_owned()))
        } else {
            Err(AppError::Invalid(format!(
                "project name {raw:?} must be 1-64 letters, digits, '-' or '_', starting with a letter or digit"
            )))
        }
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ClassNames(Vec<String>);

impl ClassNames {
    /// A classification project's classes: at least two.
    pub fn parse(raw: &[String]) -> AppResult<Self> {
        Self::parse_for(TaskKind::Classification, raw)
    }

    /// The classes of a project of `kind`: at least two to classify among,
    /// at least one to box (a detector of trees alone is the usual case).
    /// A de-identification project's first class is `face`, the one its
    /// face detector finds (`face,plate` when none are named).
    pub fn parse_for(kind: TaskKind, raw: &[String]) -> AppResult<Self> {
        let mut names: Vec<String> = raw.iter().map(|s| s.trim().to_owned()).collect();
        if names.is_empty() {
            names = kind
                .default_classes()
                .iter()
                .map(|c| (*c).to_owned())
                .collect();
        }
        if kind == TaskKind::Deidentify && names.first().is_some_and(|first| first != "face") {
            return Err(AppError::Invalid(format!(
                "a deidentify project's first class is face, the one its face detector finds \
                 (for example --classes face,plate), not {:?}",
                names[0]
            )));
        }
        let (least, what) = match kind {
            TaskKind::Classification => (2, "two classes"),
            TaskKind::Detection | TaskKind::Deidentify => (1, "one class"),
        };
        if names.len() < least {
            return Err(AppError::Invalid(format!(
                "a {kind} project needs at least {what}"
            )));
        }
        if let Some(bad) = names.iter().find(|n| n.is_empty() || n.len() > 100) {
            return Err(AppError::Invalid(format!(
                "class name {bad:?} must be 1-100 characters"
            )));
        }
        let mut sorted = names.clone();
        sorted.sort();
        if let Some(dup) = sorted.windows(2).find(|w| w[0] == w[1]) {
            return Err(AppError::Invalid(format!(
                "class {:?} is listed twice",
                dup[0]
            )));
        }
        Ok(Self(names))
    }

    pub fn as_slice(&self) -> &[String] {
        &self.0
    }
}

/// The architecture named by a request (`small_cnn` or `mobilenet_v2`); an
/// unknown name is refused with the valid ones.
pub fn parse_arch(raw: &str) -> AppResult<ModelArch> {
    raw.trim().parse().map_err(AppError::Invalid)
}

/// `arch` for a new project: the `null` architecture (constant answers, for
/// measuring the machinery) only when the caller asked for a
/// measurement-only project, so nobody labels real data with it by a slip.
pub fn allow_arch(arch: ModelArch, measurement_only: bool) -> AppResult<ModelArch> {
    if arch == ModelArch::Null && !measurement_only {
        return Err(AppError::Invalid(
            "the null architecture answers the same for every image and is for measuring sieve itself; ask for a measurement-only project to use it".into(),
        ));
    }
    Ok(arch)
}

/// The architecture a project of `kind` runs when `arch` was asked for: a
/// detection project always runs the detector (asked for, or the default
/// left as it is), a de-identification project the face detector, a
/// classification project neither.
pub fn arch_of_kind(kind: TaskKind, arch: ModelArch) -> AppResult<ModelArch> {
    match (kind, arch) {
        (TaskKind::Detection, ModelArch::SmallCnn | ModelArch::Detector) => Ok(ModelArch::Detector),
        (TaskKind::Deidentify, ModelArch::SmallCnn | ModelArch::Faces) => Ok(ModelArch::Faces),
        (TaskKind::Classification, arch)
            if !matches!(arch, ModelArch::Detector | ModelArch::Faces) =>
        {
            Ok(arch)
        }
        (kind, arch) => Err(AppError::Invalid(format!(
            "a {kind} project cannot run {arch}: {}",
            match kind {
                TaskKind::Detection => "detection projects run the detector",
                TaskKind::Deidentify => "de-identification projects run the face detector",
                TaskKind::Classification => "the detectors draw boxes, not classes",
            }
        ))),
    }
}

/// A project as the rest of the scheduler sees it: typed, validated.
#[derive(Clone, Debug, Serialize, utoipa::ToSchema)]
pub struct Project {
    #[schema(value_type = uuid::Uuid)]
    pub id: ProjectId,
    pub name: String,
    pub class_names: Vec<String>,
    pub policy: Policy,
    pub policy_version: i32,
    pub active_model_version_id: Option<Uuid>,
    /// What the project's committees are built on; every version, the
    /// first untrained one included, uses it.
    pub arch: ModelArch,
    /// What people and models say about each image; the stages ask the
    /// kind's module (`kind/`) what its labels are.
    pub task_kind: TaskKind,
    /// A detection or deidentify project's tile size and proposal
    /// threshold, as stored (absent: the defaults).
    pub boxes: BoxSettings,
}

impl Project {
    pub fn from_model(model: project::Model) -> AppResult<Self> {
        let class_names = serde_json::from_value(model.class_names)
            .map_err(|e| anyhow::anyhow!("project {} has corrupt class names: {e}", model.name))?;
        let policy = serde_json::from_value(model.policy)
            .map_err(|e| anyhow::anyhow!("project {} has a corrupt policy: {e}", model.name))?;
        let arch = model.model_arch.parse::<ModelArch>().map_err(|e| {
            anyhow::anyhow!(
                "project {} has a corrupt model architecture: {e}",
                model.name
            )
        })?;
        let task_kind = model
            .task_kind
            .parse::<TaskKind>()
            .map_err(|e| anyhow::anyhow!("project {} has a corrupt task kind: {e}", model.name))?;
        let boxes = serde_json::from_value(model.box_settings)
            .map_err(|e| anyhow::anyhow!("project {} has corrupt box settings: {e}", model.name))?;
        Ok(Self {
            boxes,
            task_kind,
            id: ProjectId::from_uuid(model.id),
            name: model.name,
            class_names,
            policy,
            policy_version: model.policy_version,
            active_model_version_id: model.active_model_version_id,
            arch,
        })
    }

    /// The parameters of a training run of this project: its architecture
    /// and the mode that architecture trains in by default (heads only for
    /// MobileNetV2), for the first model, every automatic retrain and every
    /// retrain that asks for nothing else (see `training::RetrainRequest`),
    /// with the project's box settings.
    pub fn train_params(&self) -> TrainParams {
        self.boxes.apply(TrainParams::for_arch(self.arch))
    }

    /// The box settings in force: 422 for a project that draws no boxes.
    pub fn box_settings(&self) -> AppResult<InForce> {
        self.boxes.in_force(self.arch).ok_or_else(|| {
            AppError::Invalid(format!(
                "project {} is a {} project: box settings belong to detection and deidentify projects",
                self.name, self.task_kind
            ))
        })
    }
}

/// Make `change` to `project`'s box settings and return those now in force.
/// Nothing is stored unless all of it is valid.
pub async fn set_box_settings(
    db: &DatabaseConnection,
    project: &Project,
    change: BoxSettingsChange,
) -> AppResult<InForce> {
    project.box_settings()?;
    let settings = project.boxes.changed(change);
    settings.check(project.arch)?;
    project::Entity::update(project::ActiveModel {
        id: Set(project.id.as_uuid()),
        box_settings: Set(serde_json::to_value(settings).map_err(anyhow::Error::from)?),
        updated_at: Set(Utc::now().fixed_offset()),
        ..Default::default()
    })
    .exec(db)
    .await?;
    tracing::info!(project = %project.name, ?settings, "box settings changed; they apply from the next training run");
    Project {
        boxes: settings,
        ..project.clone()
    }
    .box_settings()
}

pub async fn create(
    db: &DatabaseConnection,
    name: &ProjectName,
    classes: &ClassNames,
    policy: &Policy,
    arch: ModelArch,
    kind: TaskKind,
) -> AppResult<Project> {
    policy.validate_for(kind)?;
    let arch = arch_of_kind(kind, arch)?;
    if find_by_name(db, name.as_str()).await?.is_some() {
        return Err(AppError::Conflict(format!(
            "project {} already exists",
            name.as_str()
        )));
    }
    let now = Utc::now().fixed_offset();
    let model = project::ActiveModel {
        id: Set(ProjectId::new().as_uuid()),
        name: Set(name.as_str().to_owned()),
        task_kind: Set(kind.as_str().to_owned()),
        class_names: Set(serde_json::json!(classes.as_slice())),
        policy: Set(serde_json::to_value(policy).map_err(anyhow::Error::from)?),
        policy_version: Set(1),
        active_model_version_id: Set(None),
        model_arch: Set(arch.as_str().to_owned()),
        box_settings: Set(serde_json::json!({})),
        created_at: Set(now),
        updated_at: Set(now),
    };
    let inserted = project::Entity::insert(model)
        .exec_with_returning(db)
        .await?;
    Project::from_model(inserted)
}

async fn find_by_name(db: &DatabaseConnection, name: &str) -> AppResult<Option<Project>> {
    project::Entity::find()
        .filter(project::Column::Name.eq(name))
        .one(db)
        .await?
        .map(Project::from_model)
        .transpose()
}

/// Find a project by name or id; a clear 404 otherwise.
pub async fn get(db: &DatabaseConnection, name_or_id: &str) -> AppResult<Project> {
    let found = match name_or_id.parse::<Uuid>() {
        Ok(id) => project::Entity::find_by_id(id)
            .one(db)
            .await?
            .map(Project::from_model)
            .transpose()?,
        Err(_) => find_by_name(db, name_or_id).await?,
    };
    found.ok_or_else(|| {
        AppError::NotFound(format!(
            "no project named {name_or_id:?}; `sieve project list` shows the projects"
        ))
    })
}

pub async fn list(db: &DatabaseConnection) -> AppResult<Vec<Project>> {
    let models = project::Entity::find().all(db).await?;
    models.into_iter().map(Project::from_model).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_validated() {
        assert!(ProjectName::parse("fashion-mnist_1").is_ok());
        for bad in ["", "-x", "with space", "a/b", &"x".repeat(65)] {
            assert!(ProjectName::parse(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn classes_are_validated() {
        let s = |v: &[&str]| v.iter().map(|x| x.to_string()).collect::<Vec<_>>();
        assert!(ClassNames::parse(&s(&["cat", "dog"])).is_ok());
        assert!(ClassNames::parse(&s(&["cat"])).is_err());
        assert!(ClassNames::parse_for(TaskKind::Detection, &s(&["tree"])).is_ok());
        assert!(ClassNames::parse_for(TaskKind::Detection, &s(&[])).is_err());
        assert!(ClassNames::parse(&s(&["cat", " cat "])).is_err());
        assert!(ClassNames::parse(&s(&["cat", ""])).is_err());
    }

    #[test]
    fn architectures_are_validated() {
        assert!(matches!(parse_arch("small_cnn"), Ok(ModelArch::SmallCnn)));
        assert!(matches!(
            parse_arch(" mobilenet_v2"),
            Ok(ModelArch::MobilenetV2)
        ));
        let err = match parse_arch("resnet50") {
            Err(AppError::Invalid(message)) => message,
            other => panic!("resnet50 was not refused as invalid: {other:?}"),
        };
        assert!(
            err.contains("resnet50") && err.contains("small_cnn") && err.contains("mobilenet_v2"),
            "{err}"
        );
    }

    #[test]
    fn train_params_follow_the_architecture() {
        use sieve_shared::messages::TrainMode;
        let project = |arch| Project {
            id: ProjectId::new(),
            name: "p".into(),
            class_names: vec!["a".into(), "b".into()],
            policy: Policy::default(),
            policy_version: 1,
            active_model_version_id: None,
            arch,
            task_kind: TaskKind::Classification,
            boxes: BoxSettings::default(),
        };
        let small = project(ModelArch::SmallCnn).train_params();
        assert_eq!(
            (small.arch, small.mode),
            (ModelArch::SmallCnn, TrainMode::Full)
        );
        let mobile = project(ModelArch::MobilenetV2).train_params();
        assert_eq!(
            (mobile.arch, mobile.mode, mobile.input_size()),
            (ModelArch::MobilenetV2, TrainMode::Heads, 96)
        );
    }
}

//! Where a project's scoped tokens may ingest from.
//!
//! An ingest reads with the server's credentials: sieve's store, and every
//! bucket the `s3.*` settings reach. A token scoped to one project must not
//! use them to read what belongs to others, so each project lists the
//! locations (`store:PREFIX`, `s3://BUCKET/PREFIX`) its scoped tokens may
//! name: a prefix ingest within one of them, a manifest stored within one,
//! and every `key` row of that manifest within one. A project lists none
//! until an administrator sets them (`sieve project sources`); tokens for
//! every project (operators of the whole server) are not held to a list.

use sea_orm::{ConnectionTrait, DatabaseConnection, Statement};

use crate::error::{AppError, AppResult};
use crate::ingest::prefix::{BadPrefix, Prefix};
use crate::projects::Project;

/// A project's allowed ingest sources.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Allowed {
    /// The project's name, for messages.
    pub project: String,
    pub locations: Vec<Prefix>,
}

impl Allowed {
    /// `locations` as written (`store:PREFIX`, `s3://BUCKET/PREFIX`).
    pub fn parse(project: &str, locations: &[String]) -> Result<Self, BadPrefix> {
        Ok(Allowed {
            project: project.to_owned(),
            locations: locations
                .iter()
                .map(|l| Prefix::parse(l))
                .collect::<Result<_, _>>()?,
        })
    }

    /// The locations as written, in order.
    pub fn written(&self) -> Vec<String> {
        self.locations.iter().map(ToString::to_string).collect()
    }

    /// Whether `location` lies within one of them.
    pub fn covers(&self, location: &Prefix) -> bool {
        self.locations
            .iter()
            .any(|allowed| allowed.contains(location))
    }

    /// Whether the key of sieve's store `key` lies within one of them.
    pub fn covers_key(&self, key: &str) -> bool {
        self.locations
            .iter()
            .any(|allowed| allowed.contains_key(key))
    }

    /// Why `what`, outside the list, is refused.
    pub fn outside(&self, what: &str) -> String {
        let allowed = if self.locations.is_empty() {
            "none yet".to_owned()
        } else {
            self.written().join(", ")
        };
        format!(
            "{what} is outside the sources project {project} allows its tokens ({allowed}); an administrator adds one with `sieve project sources {project} --allow LOCATION`",
            project = self.project
        )
    }
}

impl Prefix {
    /// Whether `other` lies within this location: the same store or
    /// bucket, and its prefix this one or below it (whole path segments).
    pub fn contains(&self, other: &Prefix) -> bool {
        match (self, other) {
            (Prefix::Store { prefix }, Prefix::Store { prefix: theirs }) => below(prefix, theirs),
            (
                Prefix::S3 { bucket, prefix },
                Prefix::S3 {
                    bucket: their_bucket,
                    prefix: theirs,
                },
            ) => bucket == their_bucket && below(prefix, theirs),
            _ => false,
        }
    }

    /// Whether `key`, a key of sieve's store, lies within this location.
    pub fn contains_key(&self, key: &str) -> bool {
        matches!(self, Prefix::Store { prefix } if below(prefix, key))
    }
}

/// Whether `path` is `prefix` or below it, segment by segment.
fn below(prefix: &str, path: &str) -> bool {
    prefix.is_empty()
        || path == prefix
        || path
            .strip_prefix(prefix)
            .is_some_and(|rest| rest.starts_with('/'))
}

/// The sources `project` allows its scoped tokens.
pub async fn load(db: &impl ConnectionTrait, project: &Project) -> AppResult<Allowed> {
    let row = db
        .query_one_raw(Statement::from_sql_and_values(
            db.get_database_backend(),
            "SELECT ingest_sources FROM projects WHERE id = $1",
            [project.id.as_uuid().into()],
        ))
        .await?
        .ok_or_else(|| AppError::NotFound(format!("no project {}", project.name)))?;
    let locations: Vec<String> = row
        .try_get("", "ingest_sources")
        .map_err(|e| AppError::Internal(e.into()))?;
    Allowed::parse(&project.name, &locations).map_err(|e| {
        AppError::Internal(anyhow::anyhow!(
            "project {} has a stored ingest source that no longer parses: {e}",
            project.name
        ))
    })
}

/// Replace the sources `project` allows its scoped tokens.
pub async fn set(db: &DatabaseConnection, project: &Project, allowed: &Allowed) -> AppResult<()> {
    let locations = allowed.written();
    db.execute_raw(Statement::from_sql_and_values(
        db.get_database_backend(),
        "UPDATE projects SET ingest_sources = $2 WHERE id = $1",
        [project.id.as_uuid().into(), locations.into()],
    ))
    .await?;
    Ok(())
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn at(text: &str) -> Prefix {
        Prefix::parse(text).unwrap()
    }

    #[test]
    fn a_location_covers_what_lies_below_it_whole_segments_only() {
        let allowed = Allowed {
            project: "p".into(),
            locations: vec![at("store:uploads/cats"), at("s3://photos/cats/")],
        };
        assert!(allowed.covers(&at("store:uploads/cats")));
        assert!(allowed.covers(&at("store:uploads/cats/2026")));
        assert!(
            !allowed.covers(&at("store:uploads/catsup")),
            "a name that only starts alike"
        );
        assert!(!allowed.covers(&at("store:uploads")), "above it");
        assert!(allowed.covers(&at("s3://photos/cats/a")));
        assert!(!allowed.covers(&at("s3://photos/dogs")));
        assert!(!allowed.covers(&at("s3://other/cats")), "another bucket");
        assert!(!allowed.covers(&at("s3://photos")), "the whole bucket");
        assert!(allowed.covers_key("uploads/cats/a.png"));
        assert!(!allowed.covers_key("uploads/dogs/a.png"));
        assert!(!Allowed::default().covers(&at("store:anything")));
        let bucket = Allowed {
            project: "p".into(),
            locations: vec![at("s3://photos")],
        };
        assert!(bucket.covers(&at("s3://photos/any/where")));
        assert!(
            !bucket.covers_key("photos/a.png"),
            "a bucket is not the store"
        );
    }

    #[test]
    fn stored_locations_read_back_as_written() {
        let allowed = Allowed::parse("p", &["store:a/b/".into(), "s3://bkt".into()]).unwrap();
        let written = allowed.written();
        assert_eq!(written, ["store:a/b/", "s3://bkt/"]);
        assert_eq!(Allowed::parse("p", &written).unwrap(), allowed);
        assert!(
            allowed
                .outside("store:x/")
                .contains("store:a/b/, s3://bkt/")
        );
    }
}

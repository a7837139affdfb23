//! Identifier newtypes.
//!
//! Every entity and message id is a UUID v7: time-ordered, so primary-key
//! indexes stay append-mostly, and generated anywhere without coordination.
//! A newtype per entity keeps an item id from being passed where a project id
//! is expected; the compiler catches what a code review would miss.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};
use uuid::Uuid;

macro_rules! id_type {
    ($(#[$meta:meta])* $name:ident) => {
        $(#[$meta])*
        #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
        #[serde(transparent)]
        pub struct $name(Uuid);

        impl $name {
            /// A fresh, time-ordered id.
            pub fn new() -> Self {
                Self(Uuid::now_v7())
            }

            pub const fn from_uuid(id: Uuid) -> Self {
                Self(id)
            }

            pub const fn as_uuid(&self) -> Uuid {
                self.0
            }
        }

        impl Default for $name {
            fn default() -> Self {
                Self::new()
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                self.0.fmt(f)
            }
        }

        impl FromStr for $name {
            type Err = uuid::Error;

            fn from_str(s: &str) -> Result<Self, Self::Err> {
                Uuid::parse_str(s).map(Self)
            }
        }

        impl From<Uuid> for $name {
            fn from(id: Uuid) -> Self {
                Self(id)
            }
        }

        impl From<$name> for Uuid {
            fn from(id: $name) -> Uuid {
                id.0
            }
        }
    };
}

id_type!(
    /// A labeling project: one image set, one class list, one policy.
    ProjectId
);
id_type!(
    /// One image in one project (unique per project and content hash).
    ItemId
);
id_type!(
    /// One trained model version of a project.
    ModelVersionId
);
id_type!(
    /// A human review task for one item.
    TaskId
);
id_type!(
    /// One training run (which produces at most one model version).
    TrainingRunId
);
id_type!(
    /// A message id: the idempotency key of one published job.
    JobId
);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_time_ordered_and_round_trip_as_strings() {
        let a = ItemId::new();
        let b = ItemId::new();
        assert!(a < b, "v7 ids generated later sort later");
        let parsed: ItemId = a.to_string().parse().expect("parse");
        assert_eq!(parsed, a);
        assert_eq!(serde_json::to_string(&a).expect("json"), format!("\"{a}\""));
    }
}

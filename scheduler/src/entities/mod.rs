//! sea-orm entities, one per table of `migrations/` (DESIGN §5).
//!
//! States are enums stored as text with a CHECK constraint in the schema, so a
//! typo fails in the compiler here and in PostgreSQL there.

pub mod api_token;
pub mod item;
pub mod label;
pub mod model_version;
pub mod prediction;
pub mod project;
pub mod review_task;
pub mod training_run;

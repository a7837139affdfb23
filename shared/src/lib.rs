//! What the sieve scheduler and workers share.
//!
//! # Layout
//! - [`ids`]: id newtypes (UUID v7) for every entity and message.
//! - [`messages`]: the messages on RabbitMQ, each tied to its route, with a
//!   schema version checked on decode.
//! - [`topology`]: queue and exchange names and their one declaration.
//! - [`broker`]: connections, the confirming publisher, consumers.
//! - [`retry`]: transient failures retried through delay queues; where a
//!   dead letter came from.
//! - [`kind`]: task kinds (what a project labels: classification, detection).
//! - [`boxes`]: a detection label's boxes, as stored and as checked.
//! - [`tiles`]: overlapping tiles of a large image for a detector.
//! - [`box_scores`]: a detector committee's boxes matched into objects, and
//!   how sure it is of each and of the image.
//! - [`scores`]: committee uncertainty scores (DESIGN §6).
//! - [`settings`]: typed settings (defaults, `sieve.toml`, `SIEVE_*`).
//! - [`store`]: object storage (local directory by default).
//! - [`live`]: losable live state in Redis (worker heartbeats).
//! - [`telemetry`]: logs and Prometheus metrics.
//! - [`shutdown`]: the signal both binaries stop on (Ctrl-C, SIGTERM).
//! - [`error`]: errors both services act on.

pub mod blocking;
pub mod box_scores;
pub mod boxes;
pub mod broker;
pub mod embedding_table;
pub mod error;
pub mod ids;
pub mod kind;
pub mod live;
pub mod messages;
pub mod retry;
pub mod scores;
pub mod settings;
pub mod shutdown;
pub mod store;
pub mod telemetry;
pub mod tiles;
pub mod topology;

pub use error::Unreachable;
pub use settings::Settings;

//! The scheduler's integration tests against the real PostgreSQL, RabbitMQ
//! and Redis, one module per subject, in one binary (one link instead of
//! one per file). Every test isolates itself with `sieve_testkit`, so they
//! run side by side on the test threads; none relies on a process of its
//! own (the process-wide Prometheus recorder only ever gets more series,
//! and each test reads those of its own project).

mod authz;
mod auto_retrain;
mod blurred_export;
mod box_settings;
mod broker_nodes;
mod browse_page;
mod chromium;
mod database;
mod dead_letters;
mod deploy_files;
mod detection;
mod dispatch_control;
mod export;
mod export_imagefolder;
mod ingest;
mod ingest_access;
mod ingest_activation;
mod ingest_api;
mod ingest_formats;
mod ingest_in_place;
mod ingest_kill;
mod ingest_s3;
mod ingest_shutdown;
mod item_image;
mod items;
mod limits;
mod metrics_access;
mod model_arch;
mod openapi;
mod promotion;
mod review_api;
mod review_conflicts;
mod review_holder;
mod review_metrics;
mod review_page;
mod review_page_boxes;
mod review_queue;
mod review_second_opinion;
mod review_two_consumers;
mod reviewers;
mod routing;
mod routing_faults;
mod secrets;
mod snapshot;
mod snapshot_retention;
mod store_backends;
mod sweeper;
mod tokens;
mod training_watchdog;
mod two_schedulers;

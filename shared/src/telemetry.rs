//! Logging and metrics set-up, shared by both binaries.

use std::sync::OnceLock;

use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};
use tracing_subscriber::EnvFilter;

/// Human-readable logs to stderr, filtered by `RUST_LOG` (default `info`).
/// Safe to call more than once (tests): later calls do nothing.
pub fn init_tracing() {
    let filter = EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| EnvFilter::new("info,sqlx=warn,sea_orm=warn,lapin=warn"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_target(false)
        .try_init();
}

/// Logs for tests: captured by the test harness (shown only for a failing
/// test), `warn` and above unless `RUST_LOG` says otherwise.
pub fn init_test_tracing() {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("warn"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_test_writer()
        .with_target(false)
        .try_init();
}

/// The process-wide Prometheus recorder. The `metrics` facade has one global
/// recorder, so this is installed once and shared (several in-process apps in
/// a test share it too).
pub fn prometheus() -> PrometheusHandle {
    static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();
    HANDLE
        .get_or_init(|| {
            let recorder = PrometheusBuilder::new().build_recorder();
            let handle = recorder.handle();
            // Fails only if another recorder was installed first; the handle
            // still renders (empty) text in that case.
            let _ = metrics::set_global_recorder(recorder);
            handle
        })
        .clone()
}

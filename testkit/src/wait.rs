//! Polling for what other tasks or processes do in their own time.

use std::future::Future;
use std::time::{Duration, Instant};

/// Poll `check` every 100 ms until it returns `Some`, or fail after
/// `timeout` naming `what` was awaited.
pub async fn eventually<T, F, Fut>(what: &str, timeout: Duration, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let start = Instant::now();
    loop {
        if let Some(value) = check().await {
            return value;
        }
        assert!(
            start.elapsed() < timeout,
            "timed out after {timeout:?} waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

//! Work on many small things on a few blocking threads.
//!
//! Reading an 850-byte image through an async file API costs two hops to a
//! blocking thread and back, more than reading and hashing it. Ingest and
//! the worker hand a whole batch to [`map_blocking`] instead: one hop per
//! run of inputs.

use tokio::task::JoinError;

/// `work` over `inputs` on up to `tasks` blocking threads, each taking a
/// contiguous run of them; the results keep the inputs' order. A panic in
/// `work` comes back as the error.
pub async fn map_blocking<T, R, W>(
    inputs: Vec<T>,
    tasks: usize,
    work: W,
) -> Result<Vec<R>, JoinError>
where
    T: Send + 'static,
    R: Send + 'static,
    W: Fn(T) -> R + Clone + Send + 'static,
{
    let total = inputs.len();
    let run = total.div_ceil(tasks.max(1)).max(1);
    let mut inputs = inputs.into_iter();
    let mut handles = Vec::with_capacity(total.div_ceil(run));
    loop {
        let chunk: Vec<T> = inputs.by_ref().take(run).collect();
        if chunk.is_empty() {
            break;
        }
        let work = work.clone();
        handles.push(tokio::task::spawn_blocking(move || {
            chunk.into_iter().map(work).collect::<Vec<R>>()
        }));
    }
    let mut results = Vec::with_capacity(total);
    for handle in handles {
        results.extend(handle.await?);
    }
    Ok(results)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn keeps_the_order_of_the_inputs_across_threads() {
        for (n, tasks) in [(0, 4), (1, 4), (7, 3), (100, 16), (5, 0)] {
            let inputs: Vec<u32> = (0..n).collect();
            let doubled = map_blocking(inputs, tasks, |x| (x * 2, std::thread::current().id()))
                .await
                .expect("no panic");
            let values: Vec<u32> = doubled.iter().map(|(v, _)| *v).collect();
            assert_eq!(
                values,
                (0..n).map(|x| x * 2).collect::<Vec<_>>(),
                "{n} on {tasks}"
            );
        }
    }

    #[tokio::test]
    async fn a_panic_is_the_error() {
        let result = map_blocking(vec![1, 2, 3], 2, |x: i32| {
            assert!(x != 3, "boom");
            x
        })
        .await;
        assert!(result.expect_err("panicked").is_panic());
    }
}

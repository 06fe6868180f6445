//! Many callers, one query: callers hand an item to a [`Batcher`] and await its result; a few
//! worker tasks take whatever has queued up (up to a cap) and run one function over the whole
//! batch. Thousands of in-flight sends thus cost one look-up query and one delivery upsert
//! per batch, never one per message, and batches grow by themselves under load.

use std::{future::Future, sync::Arc};

use tokio::sync::{Mutex, mpsc, oneshot};

/// A batch failed; every caller in it gets the reason.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BatchError {
    #[error("{0}")]
    Failed(String),
    #[error("the batcher stopped")]
    Stopped,
}

type Job<I, O> = (I, oneshot::Sender<Result<O, BatchError>>);

/// A handle to the batching workers; cheap to clone.
pub struct Batcher<I, O> {
    tx: mpsc::Sender<Job<I, O>>,
    name: &'static str,
}

impl<I, O> Clone for Batcher<I, O> {
    fn clone(&self) -> Self {
        Batcher {
            tx: self.tx.clone(),
            name: self.name,
        }
    }
}

impl<I, O> std::fmt::Debug for Batcher<I, O> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Batcher").field("name", &self.name).finish()
    }
}

impl<I: Send + 'static, O: Send + 'static> Batcher<I, O> {
    /// Starts `workers` tasks, each running `f` over batches of at most `max` items. `f`
    /// returns one output per input, in order.
    pub fn spawn<F, Fut>(name: &'static str, workers: usize, max: usize, f: F) -> Self
    where
        F: Fn(Vec<I>) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<Vec<O>, String>> + Send + 'static,
    {
        let (tx, rx) = mpsc::channel::<Job<I, O>>(max.saturating_mul(workers.max(1)).max(1));
        let rx = Arc::new(Mutex::new(rx));
        let f = Arc::new(f);
        for _ in 0..workers.max(1) {
            let rx = rx.clone();
            let f = f.clone();
            tokio::spawn(async move {
                loop {
                    let mut jobs = Vec::new();
                    {
                        let mut rx = rx.lock().await;
                        let Some(first) = rx.recv().await else {
                            return;
                        };
                        jobs.push(first);
                        while jobs.len() < max {
                            match rx.try_recv() {
                                Ok(job) => jobs.push(job),
                                Err(_) => break,
                            }
                        }
                    }
                    let (items, replies): (Vec<I>, Vec<_>) = jobs.into_iter().unzip();
                    let n = items.len();
                    match f(items).await {
                        Ok(outs) if outs.len() == n => {
                            for (reply, out) in replies.into_iter().zip(outs) {
                                let _ = reply.send(Ok(out));
                            }
                        }
                        Ok(outs) => {
                            let e = format!("{name}: {} results for {n} items", outs.len());
                            for reply in replies {
                                let _ = reply.send(Err(BatchError::Failed(e.clone())));
                            }
                        }
                        Err(e) => {
                            tracing::warn!(batcher = name, items = n, error = %e, "batch failed");
                            for reply in replies {
                                let _ = reply.send(Err(BatchError::Failed(e.clone())));
                            }
                        }
                    }
                }
            });
        }
        Batcher { tx, name }
    }

    /// Queues `item` and waits for its batch's result.
    pub async fn call(&self, item: I) -> Result<O, BatchError> {
        let (reply, rx) = oneshot::channel();
        self.tx
            .send((item, reply))
            .await
            .map_err(|_| BatchError::Stopped)?;
        rx.await.map_err(|_| BatchError::Stopped)?
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use super::*;

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn concurrent_calls_share_batches_and_get_their_own_results() {
        let calls = Arc::new(AtomicUsize::new(0));
        let counted = calls.clone();
        let b = Batcher::spawn("double", 1, 100, move |xs: Vec<u64>| {
            counted.fetch_add(1, Ordering::SeqCst);
            async move {
                tokio::time::sleep(std::time::Duration::from_millis(20)).await;
                Ok(xs.into_iter().map(|x| x * 2).collect())
            }
        });
        let handles: Vec<_> = (0..500u64)
            .map(|i| {
                let b = b.clone();
                tokio::spawn(async move { (i, b.call(i).await.unwrap()) })
            })
            .collect();
        for h in handles {
            let (i, out) = h.await.unwrap();
            assert_eq!(out, i * 2);
        }
        let n = calls.load(Ordering::SeqCst);
        assert!(n < 50, "{n} batches for 500 calls");
    }
}

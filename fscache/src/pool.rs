//! A fixed set of worker threads for backend calls (which may block on the network). Both frontends
//! keep kernel I/O on their own loop thread and hand backend work here.

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::{mpsc, Arc, Mutex};
use std::thread::JoinHandle;

type Job = Box<dyn FnOnce() + Send + 'static>;

/// Worker threads fed from one queue. Dropping the pool finishes queued jobs and joins the threads.
#[derive(Debug)]
pub(crate) struct Pool {
    tx: Option<mpsc::Sender<Job>>,
    threads: Vec<JoinHandle<()>>,
}

impl Pool {
    /// Starts `n` (at least 1) threads named `name-<i>`.
    pub(crate) fn new(n: usize, name: &str) -> std::io::Result<Self> {
        let (tx, rx) = mpsc::channel::<Job>();
        let rx = Arc::new(Mutex::new(rx));
        let mut threads = Vec::new();
        for i in 0..n.max(1) {
            let rx = Arc::clone(&rx);
            let t = std::thread::Builder::new().name(format!("{name}-{i}")).spawn(move || loop {
                let job = match rx.lock() {
                    Ok(rx) => rx.recv(),
                    Err(_) => return,
                };
                let Ok(job) = job else { return };
                // A panicking job must not take the worker with it; its request is answered by the
                // job's drop guard (see the frontends).
                if catch_unwind(AssertUnwindSafe(job)).is_err() {
                    tracing::error!("worker job panicked");
                }
            })?;
            threads.push(t);
        }
        Ok(Pool { tx: Some(tx), threads })
    }

    /// Queues a job.
    pub(crate) fn spawn(&self, job: impl FnOnce() + Send + 'static) {
        if let Some(tx) = &self.tx {
            // Fails only if every worker exited, which happens only after drop started.
            let _ = tx.send(Box::new(job));
        }
    }
}

impl Drop for Pool {
    fn drop(&mut self) {
        self.tx = None;
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    #[test]
    fn runs_jobs_and_survives_panics() {
        let count = Arc::new(AtomicUsize::new(0));
        {
            let pool = Pool::new(2, "t").unwrap();
            pool.spawn(|| panic!("boom"));
            for _ in 0..10 {
                let c = Arc::clone(&count);
                pool.spawn(move || {
                    c.fetch_add(1, Ordering::SeqCst);
                });
            }
        }
        assert_eq!(count.load(Ordering::SeqCst), 10);
    }
}

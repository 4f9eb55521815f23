//! bcrypt hashing off the async runtime, behind a bounded queue.
//!
//! At most one hash runs per core (on tokio's blocking pool); up to
//! `max_pending` more wait their turn, and beyond that a call is shed at once
//! with `RESOURCE_EXHAUSTED` instead of queueing without bound.

use std::sync::{
    Arc,
    atomic::{AtomicU64, AtomicUsize, Ordering},
};

use tokio::sync::{OnceCell, Semaphore};
use tracing::Instrument as _;

use crate::{
    domain::account::MAX_PASSWORD_BYTES,
    error::{AppError, OVERLOAD_RETRY, Reason},
};

pub struct PasswordHasher {
    cost: u32,
    /// One permit per hash allowed to run at the same time.
    workers: Semaphore,
    /// Hashes waiting for a worker (not yet running).
    waiting: AtomicUsize,
    max_pending: usize,
    /// Hash of a random password, verified for unknown users so that their
    /// failure costs the same time as a wrong password.
    dummy_hash: OnceCell<String>,
    /// bcrypt runs so far (hashes and verifications), for tests and metrics.
    runs: AtomicU64,
}

/// Decrements the waiting count however the wait ends (even if cancelled).
struct WaitingGuard<'a>(&'a AtomicUsize);

impl Drop for WaitingGuard<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

/// Runs bcrypt threads at nice 10, so that under a login flood the async
/// threads serving every other call still get the CPU first (the kernel
/// weighs nice 0 about ten times nice 10), while idle cores still go to
/// bcrypt. Once per blocking-pool thread; raising priority back would need
/// privileges, and the other blocking work here (none on the hot path) can
/// live with it.
fn lower_thread_priority() {
    thread_local! {
        static LOWERED: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
    }
    LOWERED.with(|lowered| {
        if !lowered.replace(true) {
            #[cfg(target_os = "linux")]
            // SAFETY: setpriority only reads its integer arguments; on Linux
            // PRIO_PROCESS with 0 applies to the calling thread alone.
            unsafe {
                libc::setpriority(libc::PRIO_PROCESS, 0, 10);
            }
        }
    });
}

impl PasswordHasher {
    pub fn new(cost: u32, max_pending: usize) -> Arc<Self> {
        let cores = std::thread::available_parallelism().map_or(2, usize::from);
        Arc::new(Self {
            cost,
            workers: Semaphore::new(cores),
            waiting: AtomicUsize::new(0),
            max_pending,
            dummy_hash: OnceCell::new(),
            runs: AtomicU64::new(0),
        })
    }

    /// Runs one bcrypt job on the blocking pool, or sheds it when too many wait.
    async fn run<T: Send + 'static>(
        &self,
        job: impl FnOnce() -> T + Send + 'static,
    ) -> Result<T, AppError> {
        let waiting_before = self.waiting.fetch_add(1, Ordering::SeqCst);
        let waiting = WaitingGuard(&self.waiting);
        if waiting_before >= self.max_pending {
            return Err(AppError::throttled(
                Reason::ServerOverloaded,
                "too many password checks in progress; retry shortly",
                OVERLOAD_RETRY,
            ));
        }
        let _permit = self.workers.acquire().await.map_err(AppError::internal)?;
        drop(waiting);
        self.runs.fetch_add(1, Ordering::Relaxed);
        let span = tracing::Span::current();
        tokio::task::spawn_blocking(move || {
            lower_thread_priority();
            span.in_scope(job)
        })
        .in_current_span()
        .await
        .map_err(AppError::internal)
    }

    /// How many bcrypt computations have run (hashes and verifications).
    pub fn runs(&self) -> u64 {
        self.runs.load(Ordering::Relaxed)
    }

    #[tracing::instrument(level = "debug", skip_all)]
    pub async fn hash(&self, password: &str) -> Result<String, AppError> {
        let password = password.to_owned();
        let cost = self.cost;
        self.run(move || bcrypt::non_truncating_hash(password, cost))
            .await?
            .map_err(AppError::internal)
    }

    /// True when `password` matches `hash`. Passwords longer than bcrypt takes
    /// whole never match (they could only have been truncated), but still cost
    /// one verification so the answer takes the usual time.
    #[tracing::instrument(level = "debug", skip_all)]
    pub async fn verify(&self, password: &str, hash: &str) -> Result<bool, AppError> {
        if password.len() > MAX_PASSWORD_BYTES {
            self.verify_dummy().await?;
            return Ok(false);
        }
        let password = password.to_owned();
        let hash = hash.to_owned();
        self.run(move || bcrypt::verify(password, &hash).unwrap_or(false))
            .await
    }

    /// Spends one verification at the configured cost, for unknown users.
    pub async fn verify_dummy(&self) -> Result<(), AppError> {
        let dummy = self
            .dummy_hash
            .get_or_try_init(|| async {
                let cost = self.cost;
                self.run(move || bcrypt::hash("dummy password for unknown users", cost))
                    .await?
                    .map_err(AppError::internal)
            })
            .await?
            .clone();
        self.run(move || bcrypt::verify("not the dummy password", &dummy).unwrap_or(false))
            .await?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_hash_verifies_its_password_and_no_other() {
        let hasher = PasswordHasher::new(4, 8);
        let hash = hasher.hash("correct horse battery").await.unwrap();
        assert!(hash.starts_with("$2b$04$"));
        assert!(hasher.verify("correct horse battery", &hash).await.unwrap());
        assert!(!hasher.verify("correct horse batterY", &hash).await.unwrap());
    }

    #[tokio::test]
    async fn passwords_longer_than_71_bytes_never_match_a_truncated_prefix() {
        let hasher = PasswordHasher::new(4, 8);
        let seventy_two = "a".repeat(72);
        // bcrypt's truncating hash of 72 bytes equals that of its prefix: our
        // verify must not accept the longer password against it.
        let truncated = bcrypt::hash(&seventy_two, 4).unwrap();
        assert!(
            !hasher
                .verify(&(seventy_two.clone() + "tail"), &truncated)
                .await
                .unwrap()
        );
        assert!(
            hasher.hash(&seventy_two).await.is_err(),
            "hashing refuses, never truncates"
        );
    }

    #[tokio::test]
    async fn the_dummy_verification_runs_at_the_configured_cost() {
        let hasher = PasswordHasher::new(4, 8);
        hasher.verify_dummy().await.unwrap();
        assert!(hasher.dummy_hash.get().unwrap().starts_with("$2b$04$"));
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn hashes_beyond_the_pending_limit_are_shed() {
        let hasher = PasswordHasher::new(10, 1);
        let calls: Vec<_> = (0..16)
            .map(|_| {
                let hasher = Arc::clone(&hasher);
                tokio::spawn(async move { hasher.hash("some long password").await })
            })
            .collect();
        let mut shed = 0;
        for call in calls {
            if let Err(AppError::Refused {
                reason: Reason::ServerOverloaded,
                ..
            }) = call.await.unwrap()
            {
                shed += 1;
            }
        }
        assert!(
            shed > 0,
            "with one waiting place, some of 16 parallel hashes are shed"
        );
    }
}

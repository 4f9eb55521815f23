//! gRPC health: a background task probes the database, follows the event
//! channel, and flips `""` and every service between SERVING and
//! NOT_SERVING: SERVING only while both are up. While the probe finds the
//! database unreachable, `Readiness` lets calls fail at once instead of each
//! waiting for a pool timeout.

use std::{
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use tokio::sync::watch;
use tonic_health::{ServingStatus, server::HealthReporter};

use crate::storage::Database;

/// The names health reports on, besides the overall `""`.
pub const SERVICE_NAMES: [&str; 4] = [
    "aimessage.v1.AuthService",
    "aimessage.v1.UserAdminService",
    "aimessage.v1.SessionService",
    "aimessage.v1.MessageService",
];

const PROBE_INTERVAL: Duration = Duration::from_secs(1);
const PROBE_TIMEOUT: Duration = Duration::from_secs(2);

/// What the probe last found, for calls to read without waiting.
#[derive(Debug)]
pub struct Readiness {
    database_reachable: AtomicBool,
    /// What health reports for `""` (also `GET /health`).
    serving: AtomicBool,
}

impl Default for Readiness {
    fn default() -> Self {
        Self {
            database_reachable: AtomicBool::new(true),
            serving: AtomicBool::new(false),
        }
    }
}

impl Readiness {
    pub fn database_reachable(&self) -> bool {
        self.database_reachable.load(Ordering::Acquire)
    }

    /// Whether health says SERVING for the server as a whole.
    pub fn serving(&self) -> bool {
        self.serving.load(Ordering::Acquire)
    }
}

/// Reports `status` for `""` and every service, and keeps `readiness` in step.
pub async fn report(reporter: &HealthReporter, readiness: &Readiness, status: ServingStatus) {
    readiness
        .serving
        .store(status == ServingStatus::Serving, Ordering::Release);
    reporter.set_service_status("", status).await;
    for name in SERVICE_NAMES {
        reporter.set_service_status(name, status).await;
    }
}

/// Probes the database every second until `stop` turns true (a probe that
/// fails or takes longer than two seconds counts as down), and follows
/// `events_connected` as it changes; NOT_SERVING unless both are up.
pub async fn probe_database(
    db: Arc<dyn Database>,
    reporter: HealthReporter,
    readiness: Arc<Readiness>,
    mut events_connected: watch::Receiver<bool>,
    mut stop: watch::Receiver<bool>,
) {
    let mut last = None;
    let mut database_up = true;
    let mut next_probe = tokio::time::Instant::now();
    loop {
        if tokio::time::Instant::now() >= next_probe {
            database_up = matches!(
                tokio::time::timeout(PROBE_TIMEOUT, db.ping()).await,
                Ok(Ok(()))
            );
            readiness
                .database_reachable
                .store(database_up, Ordering::Release);
            next_probe = tokio::time::Instant::now() + PROBE_INTERVAL;
        }
        let events_up = *events_connected.borrow_and_update();
        let status = if database_up && events_up {
            ServingStatus::Serving
        } else {
            ServingStatus::NotServing
        };
        if last != Some(status) {
            match (database_up, events_up) {
                (false, _) => tracing::warn!("database probe failed; reporting NOT_SERVING"),
                (true, false) => tracing::warn!("event channel down; reporting NOT_SERVING"),
                (true, true) if last.is_some() => {
                    tracing::info!("database and event channel up again; reporting SERVING");
                }
                (true, true) => {}
            }
            report(&reporter, &readiness, status).await;
            last = Some(status);
        }
        tokio::select! {
            () = tokio::time::sleep_until(next_probe) => {}
            changed = events_connected.changed() => {
                if changed.is_err() {
                    return;
                }
            }
            _ = stop.changed() => return,
        }
    }
}

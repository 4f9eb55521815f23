//! gRPC health: a background task probes the database and flips `""` and
//! every service between SERVING and NOT_SERVING.

use std::{sync::Arc, time::Duration};

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

pub async fn set_all(reporter: &HealthReporter, status: ServingStatus) {
    reporter.set_service_status("", status).await;
    for name in SERVICE_NAMES {
        reporter.set_service_status(name, status).await;
    }
}

/// Probes the database every second until `stop` turns true; a probe that
/// fails or takes longer than two seconds marks everything NOT_SERVING.
pub async fn probe_database(
    db: Arc<dyn Database>,
    reporter: HealthReporter,
    mut stop: watch::Receiver<bool>,
) {
    let mut last = None;
    loop {
        let healthy = matches!(
            tokio::time::timeout(PROBE_TIMEOUT, db.ping()).await,
            Ok(Ok(()))
        );
        let status = if healthy {
            ServingStatus::Serving
        } else {
            ServingStatus::NotServing
        };
        if last != Some(status) {
            if !healthy {
                tracing::warn!("database probe failed; reporting NOT_SERVING");
            } else if last.is_some() {
                tracing::info!("database reachable again; reporting SERVING");
            }
            set_all(&reporter, status).await;
            last = Some(status);
        }
        tokio::select! {
            _ = tokio::time::sleep(PROBE_INTERVAL) => {}
            _ = stop.changed() => return,
        }
    }
}

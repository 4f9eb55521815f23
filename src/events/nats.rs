//! NATS as the event bus between instances (`AI_MESSAGE_NATS_URL`).
//!
//! Every event is published on one subject per deployment and kept for a few
//! minutes in a JetStream stream on that subject, so an instance whose
//! connection broke for a moment reads what it missed from where it stopped
//! instead of losing it. The database stays the source of truth: streams end
//! while the bus is down (as with any lost event channel) and clients resume
//! from their cursor.
//!
//! Publishing is a plain NATS publish that JetStream stores: no
//! acknowledgement round trip on the caller's path, and no database lock.

use std::{sync::Arc, time::Duration};

use anyhow::Context as _;
use async_nats::{
    Client, Event,
    jetstream::{self, consumer::DeliverPolicy, consumer::push::OrderedConfig},
};
use async_trait::async_trait;
use futures::StreamExt as _;
use tokio::sync::watch;

use crate::{config::NatsUrl, storage::EventChannel};

/// How long JetStream keeps events for instances that reconnect.
const KEPT_FOR: Duration = Duration::from_secs(300);
/// At most this much is kept, the oldest dropped first.
const KEPT_BYTES: i64 = 256 * 1024 * 1024;
/// A silent connection is found by unanswered pings: the client gives up
/// on the third one outstanding, so at this interval within 9-12 s (the
/// contract: 15 s).
const PING_INTERVAL: Duration = Duration::from_secs(3);
/// The longest wait between reconnection attempts, so delivery resumes
/// within 5 s of the server's return.
const MAX_RECONNECT_DELAY: Duration = Duration::from_secs(1);
/// A publish that cannot be handed to the client in this time is dropped
/// (logged): a caller never waits on a bus that stalls.
const PUBLISH_TIMEOUT: Duration = Duration::from_millis(500);
/// How long start-up waits for the first subscription before it goes on
/// with the bus down (it keeps trying in the background).
const FIRST_SUBSCRIPTION_TIMEOUT: Duration = Duration::from_secs(5);
const RETRY: Duration = Duration::from_millis(250);

#[derive(Clone)]
pub struct NatsEventChannel {
    client: Client,
    jetstream: jetstream::Context,
    subject: String,
    stream: String,
    /// Whether the client is connected right now, from its event callback.
    client_up: watch::Receiver<bool>,
}

impl NatsEventChannel {
    /// A client for `url` that connects in the background (the server starts
    /// even while NATS is away) and keeps reconnecting; subjects are named
    /// after `deployment_id`.
    pub async fn connect(url: &NatsUrl, deployment_id: &str) -> anyhow::Result<Arc<Self>> {
        let (client_up_tx, client_up) = watch::channel(false);
        let client = async_nats::ConnectOptions::new()
            .name("ai-message")
            .ping_interval(PING_INTERVAL)
            .retry_on_initial_connect()
            .max_reconnects(None)
            // The first attempt at once, then a little longer each time.
            .reconnect_delay_callback(|attempts| {
                let waited = u32::try_from(attempts.saturating_sub(1)).unwrap_or(u32::MAX);
                RETRY.saturating_mul(waited).min(MAX_RECONNECT_DELAY)
            })
            .event_callback(move |event| {
                let client_up = client_up_tx.clone();
                async move {
                    match event {
                        Event::Connected => {
                            client_up.send_replace(true);
                        }
                        Event::Disconnected | Event::Closed => {
                            client_up.send_replace(false);
                        }
                        other => tracing::debug!(event = %other, "event bus"),
                    }
                }
            })
            .connect(url.as_str())
            .await
            .context("AI_MESSAGE_NATS_URL: cannot set up the NATS client")?;
        let jetstream = jetstream::new(client.clone());
        Ok(Arc::new(Self {
            client,
            jetstream,
            subject: subject(deployment_id),
            stream: stream_name(deployment_id),
            client_up,
        }))
    }

    /// The stream (created if missing) and a consumer on it from
    /// `start_sequence` (or from now on, at the first start).
    async fn subscribe(
        &self,
        start_sequence: Option<u64>,
    ) -> anyhow::Result<jetstream::consumer::push::Ordered> {
        let stream = self
            .jetstream
            .get_or_create_stream(jetstream::stream::Config {
                name: self.stream.clone(),
                subjects: vec![self.subject.clone()],
                max_age: KEPT_FOR,
                max_bytes: KEPT_BYTES,
                discard: jetstream::stream::DiscardPolicy::Old,
                storage: jetstream::stream::StorageType::File,
                ..Default::default()
            })
            .await?;
        let consumer = stream
            .create_consumer(OrderedConfig {
                deliver_subject: self.client.new_inbox(),
                filter_subject: self.subject.clone(),
                deliver_policy: match start_sequence {
                    Some(start_sequence) => DeliverPolicy::ByStartSequence { start_sequence },
                    None => DeliverPolicy::New,
                },
                ..Default::default()
            })
            .await?;
        Ok(consumer.messages().await?)
    }
}

/// The subject of a deployment's events.
fn subject(deployment_id: &str) -> String {
    format!("aimessage.{deployment_id}.events")
}

/// The JetStream stream that keeps a deployment's events.
pub fn stream_name(deployment_id: &str) -> String {
    format!("AIMESSAGE_{deployment_id}")
}

#[async_trait]
impl EventChannel for NatsEventChannel {
    async fn publish(&self, payloads: Vec<String>, _now: i64) -> anyhow::Result<()> {
        // While disconnected the client would queue the events until it
        // reconnects; other instances' streams have ended meanwhile anyway.
        anyhow::ensure!(*self.client_up.borrow(), "the event bus is not connected");
        tokio::time::timeout(PUBLISH_TIMEOUT, async {
            for payload in payloads {
                self.client
                    .publish(self.subject.clone(), payload.into())
                    .await?;
            }
            anyhow::Ok(())
        })
        .await
        .context("the event bus did not take the events in time")??;
        Ok(())
    }

    async fn start_listener(
        &self,
        deliver: Arc<dyn Fn(String) + Send + Sync>,
        connected: watch::Sender<bool>,
        _now: crate::storage::Clock,
        mut stop: watch::Receiver<bool>,
    ) -> anyhow::Result<tokio::task::JoinHandle<()>> {
        let channel = self.clone();
        // The first subscription, if NATS answers soon: then streams can open
        // from the first call. Else the loop below keeps trying.
        let first = tokio::time::timeout(FIRST_SUBSCRIPTION_TIMEOUT, async {
            let mut client_up = channel.client_up.clone();
            let _ = client_up.wait_for(|up| *up).await;
            channel.subscribe(None).await
        })
        .await;
        let mut messages = match first {
            Ok(Ok(messages)) => {
                connected.send_replace(true);
                Some(messages)
            }
            Ok(Err(error)) => {
                tracing::warn!(error = %error, "the event bus is not ready; streams wait for it");
                None
            }
            Err(_) => {
                tracing::warn!("the event bus is not reachable; streams wait for it");
                None
            }
        };
        Ok(tokio::spawn(async move {
            let mut client_up = channel.client_up.clone();
            // The stream sequence of the last event handed on: a new
            // subscription starts right after it, so nothing is skipped.
            let mut last_sequence: Option<u64> = None;
            loop {
                let Some(subscription) = messages.as_mut() else {
                    // Down: wait for the client, then subscribe again.
                    tokio::select! {
                        _ = stop.changed() => return,
                        () = tokio::time::sleep(RETRY) => {}
                    }
                    if !*client_up.borrow_and_update() {
                        continue;
                    }
                    match channel.subscribe(last_sequence.map(|seq| seq + 1)).await {
                        Ok(subscription) => {
                            messages = Some(subscription);
                            connected.send_replace(true);
                            tracing::info!("the event bus is back; streams may open again");
                        }
                        Err(error) => {
                            tracing::debug!(error = %error, "event bus subscription not back yet");
                        }
                    }
                    continue;
                };
                let lost = tokio::select! {
                    _ = stop.changed() => return,
                    _ = client_up.wait_for(|up| !*up) => true,
                    received = subscription.next() => match received {
                        Some(Ok(message)) => {
                            if let Ok(info) = message.info() {
                                last_sequence = Some(info.stream_sequence);
                            }
                            match std::str::from_utf8(&message.payload) {
                                Ok(payload) => deliver(payload.to_owned()),
                                Err(_) => tracing::warn!("ignoring a non-UTF-8 bus event"),
                            }
                            false
                        }
                        Some(Err(error)) => {
                            tracing::warn!(error = %error, "the event bus subscription broke");
                            true
                        }
                        None => true,
                    },
                };
                if lost {
                    messages = None;
                    connected.send_replace(false);
                    tracing::warn!(
                        "the event bus connection was lost; streams end until it is back"
                    );
                }
            }
        }))
    }
}

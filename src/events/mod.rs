//! Real-time events for StreamMessages: a hub of per-user broadcast channels.
//!
//! An event reaches this instance's subscribers at once, and other instances
//! through the event channel when there is one: NATS (`nats`) when
//! configured, else the database's own (PostgreSQL LISTEN/NOTIFY); SQLite,
//! one process, needs none. Each event carries the id of the instance that
//! published it, which ignores its own events when they come back. Each user has a bounded channel: a subscriber that falls
//! more than `USER_CHANNEL_CAPACITY` events behind is told it lagged instead
//! of holding others back or growing memory.
//!
//! While the database's event channel is down (its listening connection
//! broke or went silent), events from other instances are being missed: new
//! subscriptions are refused and open ones are told, so that no stream goes
//! on as if nothing were missing.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
};

use serde::{Deserialize, Serialize};
use tokio::sync::{broadcast, watch};

pub mod nats;

use crate::{
    auth::cache::SessionCache,
    domain::Clock,
    storage::{EventChannel, LoggedChange},
};

pub use crate::storage::MessageChange;

/// Events kept per user for slow subscribers before they count as lagging.
pub const USER_CHANNEL_CAPACITY: usize = 256;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum HubEvent {
    /// A message changed; delivered to its sender and its recipient, each
    /// with the event id it got in their log.
    Message(LoggedChange),
    /// The user, their sessions or their roles changed (a revocation among
    /// others): caches forget the user and open streams re-check their session.
    UserChanged { user_id: i64 },
    /// Something that touches many users changed (a role was deleted).
    AllUsersChanged,
}

impl HubEvent {
    /// The users whose streams receive the event (once each).
    fn audience(&self) -> impl Iterator<Item = i64> {
        let users = match self {
            Self::Message(logged) => {
                let mut audience = logged.message.audience();
                [audience.next(), audience.next()]
            }
            Self::UserChanged { user_id } => [Some(*user_id), None],
            Self::AllUsersChanged => [None, None],
        };
        users.into_iter().flatten()
    }
}

/// An event as it travels between instances.
#[derive(Serialize)]
struct Outgoing<'a> {
    origin: u64,
    event: &'a HubEvent,
}

#[derive(Deserialize)]
struct Incoming {
    origin: u64,
    event: HubEvent,
}

/// Events handed to the channel in one go at most (one NOTIFY transaction).
const PUBLISH_BATCH: usize = 512;

pub struct EventHub {
    /// Tells this instance's events from others' on the shared channel.
    origin: u64,
    /// Events on their way to the other instances, in order: one task sends
    /// whatever has gathered in one batch, so no caller waits for the
    /// channel and a busy instance needs few NOTIFY transactions.
    outbox: Option<tokio::sync::mpsc::UnboundedSender<String>>,
    /// One channel per user with at least one open stream on this instance.
    channels: Mutex<HashMap<i64, broadcast::Sender<Arc<HubEvent>>>>,
    /// Forgets users that another instance changed.
    sessions: Arc<SessionCache>,
    /// Whether every event of every instance reaches this hub right now:
    /// always without a remote channel, else as its listener reports.
    connected: watch::Sender<bool>,
    /// Bumped whenever a user's sessions may have changed, on any instance:
    /// revocation feeds then read the log at once instead of at their poll.
    revocations: watch::Sender<u64>,
    /// What health follows: the channel's state when the channel is the
    /// database's own (its loss is the database's), else always up (an
    /// event bus that is away leaves unary calls working).
    health: watch::Receiver<bool>,
    /// Keeps an always-up `health` open (its readers stop when it closes).
    _always_up: Option<watch::Sender<bool>>,
}

/// The event channel is down: a subscription now would miss events silently.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("the event channel is down")]
pub struct ChannelDown;

/// A user's subscription; dropping it removes the user's channel once no
/// stream listens to it any more.
pub struct Subscription {
    pub receiver: broadcast::Receiver<Arc<HubEvent>>,
    /// The hub's `connected`, to end the stream when the channel goes down.
    pub connected: watch::Receiver<bool>,
    hub: Arc<EventHub>,
    user_id: i64,
}

/// Resolves once the event channel `connected` follows is down.
pub async fn channel_lost(connected: &mut watch::Receiver<bool>) {
    let _ = connected.wait_for(|connected| !connected).await;
}

impl Drop for Subscription {
    fn drop(&mut self) {
        let mut channels = self.hub.lock();
        if let Some(sender) = channels.get(&self.user_id) {
            // This subscription's receiver is still alive here, hence `<= 1`.
            if sender.receiver_count() <= 1 {
                channels.remove(&self.user_id);
            }
        }
    }
}

/// Sends queued events to the other instances, as many per call as have
/// gathered, until the hub is gone.
async fn send_to_other_instances(
    remote: Arc<dyn EventChannel>,
    mut pending: tokio::sync::mpsc::UnboundedReceiver<String>,
    clock: Arc<dyn Clock>,
) {
    let mut batch = Vec::with_capacity(PUBLISH_BATCH);
    while pending.recv_many(&mut batch, PUBLISH_BATCH).await > 0 {
        let payloads = std::mem::replace(&mut batch, Vec::with_capacity(PUBLISH_BATCH));
        if let Err(error) = remote.publish(payloads, clock.now().micros()).await {
            tracing::warn!(error = %error, "publishing stream events to other instances failed");
        }
    }
}

impl EventHub {
    pub fn new(
        remote: Option<Arc<dyn EventChannel>>,
        sessions: Arc<SessionCache>,
        clock: Arc<dyn Clock>,
        channel_is_database: bool,
    ) -> Arc<Self> {
        let (connected, _) = watch::channel(remote.is_none());
        let (health, always_up) = if channel_is_database {
            (connected.subscribe(), None)
        } else {
            let (always_up, health) = watch::channel(true);
            (health, Some(always_up))
        };
        let outbox = remote.as_ref().map(|remote| {
            let (outbox, pending) = tokio::sync::mpsc::unbounded_channel();
            tokio::spawn(send_to_other_instances(
                Arc::clone(remote),
                pending,
                Arc::clone(&clock),
            ));
            outbox
        });
        Arc::new(Self {
            outbox,
            health,
            _always_up: always_up,
            origin: rand::random(),
            channels: Mutex::new(HashMap::new()),
            sessions,
            connected,
            revocations: watch::channel(0).0,
        })
    }

    /// Changes whenever a revocation may have been committed anywhere.
    pub fn revocation_signal(&self) -> watch::Receiver<u64> {
        self.revocations.subscribe()
    }

    /// Where the listener of the remote channel reports its state.
    pub fn connection_reporter(&self) -> watch::Sender<bool> {
        self.connected.clone()
    }

    /// Follows whether the event channel is up (for streams and the gauge).
    pub fn connection_state(&self) -> watch::Receiver<bool> {
        self.connected.subscribe()
    }

    /// Follows whether the event channel's state makes health NOT_SERVING.
    pub fn health_state(&self) -> watch::Receiver<bool> {
        self.health.clone()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<i64, broadcast::Sender<Arc<HubEvent>>>> {
        // The map stays consistent even if a holder panicked: recover it.
        self.channels
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Subscribes to the user's events from now on, unless the event channel
    /// is down. Subscribed first, checked second: a channel that goes down
    /// in between is seen by the subscription's `connected`.
    pub fn subscribe(self: &Arc<Self>, user_id: i64) -> Result<Subscription, ChannelDown> {
        let receiver = self
            .lock()
            .entry(user_id)
            .or_insert_with(|| broadcast::channel(USER_CHANNEL_CAPACITY).0)
            .subscribe();
        let subscription = Subscription {
            receiver,
            connected: self.connected.subscribe(),
            hub: Arc::clone(self),
            user_id,
        };
        if !*subscription.connected.borrow() {
            return Err(ChannelDown);
        }
        Ok(subscription)
    }

    /// Delivers the event here at once and queues it for every other
    /// instance (where there is a channel). Sending is not awaited: the
    /// change the event describes has already been committed, a failure to
    /// reach the others is logged, and their streams end while their
    /// channel is down.
    pub fn publish(&self, event: HubEvent) {
        let event = Arc::new(event);
        self.deliver(Arc::clone(&event));
        let Some(outbox) = &self.outbox else {
            return;
        };
        let outgoing = Outgoing {
            origin: self.origin,
            event: &event,
        };
        match serde_json::to_string(&outgoing) {
            // Fails only once the sending task is gone (shutting down).
            Ok(payload) => drop(outbox.send(payload)),
            Err(error) => tracing::error!(error = %error, "stream event did not serialize"),
        }
    }

    /// Hands an event from the channel to local subscribers, unless this
    /// instance published it (its subscribers already have it).
    pub fn deliver_payload(&self, payload: &str) {
        match serde_json::from_str::<Incoming>(payload) {
            Ok(incoming) if incoming.origin == self.origin => {}
            Ok(incoming) => self.deliver(Arc::new(incoming.event)),
            Err(error) => tracing::warn!(error = %error, "ignoring a malformed stream event"),
        }
    }

    fn deliver(&self, event: Arc<HubEvent>) {
        match &*event {
            HubEvent::UserChanged { user_id } => {
                self.sessions.invalidate_user(*user_id);
                self.revocations.send_modify(|n| *n = n.wrapping_add(1));
            }
            HubEvent::AllUsersChanged => {
                self.sessions.clear();
                self.revocations.send_modify(|n| *n = n.wrapping_add(1));
            }
            HubEvent::Message(_) => {}
        }
        let channels = self.lock();
        for user_id in event.audience() {
            if let Some(sender) = channels.get(&user_id) {
                // An error only means nobody listens right now.
                let _ = sender.send(Arc::clone(&event));
            }
        }
    }

    /// Call after any write that changes a user, their sessions or their
    /// roles: this instance forgets the user at once, other instances as
    /// soon as the event reaches them, and open streams re-check their session.
    pub fn user_changed(&self, user_id: i64) {
        // Delivered here first, which forgets the user in this instance's cache.
        self.publish(HubEvent::UserChanged { user_id });
    }

    /// Like `user_changed`, for a change that touches many users.
    pub fn all_users_changed(&self) {
        self.publish(HubEvent::AllUsersChanged);
    }

    /// Users with a channel on this instance (for tests and metrics).
    pub fn subscribed_users(&self) -> usize {
        self.lock().len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn message(sender_id: i64, recipient_id: i64) -> crate::storage::MessageRecord {
        crate::storage::MessageRecord {
            id: 1,
            sender_id,
            recipient_id,
            content: "hi".into(),
            is_read: false,
            parent_id: None,
            conversation_id: "c".into(),
            created_at: 0,
            read_at: None,
            edited_at: None,
            reply_count: 0,
        }
    }

    fn logged(change: MessageChange, sender_id: i64, recipient_id: i64) -> HubEvent {
        HubEvent::Message(LoggedChange {
            change,
            message: message(sender_id, recipient_id),
            event_ids: vec![(sender_id, 1), (recipient_id, 1)],
        })
    }

    /// A hub with no remote channel (one process, as with SQLite).
    fn local_hub() -> Arc<EventHub> {
        EventHub::new(
            None,
            Default::default(),
            Arc::new(crate::domain::SystemClock),
            true,
        )
    }

    #[test]
    fn events_reach_sender_and_recipient_and_nobody_else() {
        let hub = local_hub();
        let mut sender = hub.subscribe(1).unwrap();
        let mut recipient = hub.subscribe(2).unwrap();
        let mut stranger = hub.subscribe(3).unwrap();
        hub.publish(logged(MessageChange::Created, 1, 2));
        assert!(sender.receiver.try_recv().is_ok());
        assert!(recipient.receiver.try_recv().is_ok());
        assert!(stranger.receiver.try_recv().is_err());
    }

    #[test]
    fn a_note_to_oneself_arrives_once() {
        let hub = local_hub();
        let mut me = hub.subscribe(1).unwrap();
        hub.publish(logged(MessageChange::Created, 1, 1));
        assert!(me.receiver.try_recv().is_ok());
        assert!(me.receiver.try_recv().is_err());
    }

    #[test]
    fn a_slow_subscriber_is_told_it_lagged() {
        let hub = local_hub();
        let mut slow = hub.subscribe(1).unwrap();
        for _ in 0..=USER_CHANNEL_CAPACITY {
            hub.publish(HubEvent::UserChanged { user_id: 1 });
        }
        assert!(matches!(
            slow.receiver.try_recv(),
            Err(broadcast::error::TryRecvError::Lagged(_))
        ));
    }

    #[test]
    fn channels_go_away_with_their_last_subscriber() {
        let hub = local_hub();
        let first = hub.subscribe(7).unwrap();
        let second = hub.subscribe(7).unwrap();
        assert_eq!(hub.subscribed_users(), 1);
        drop(first);
        assert_eq!(hub.subscribed_users(), 1);
        drop(second);
        assert_eq!(hub.subscribed_users(), 0);
    }

    #[test]
    fn no_subscription_while_the_channel_is_down_and_open_ones_are_told() {
        let hub = local_hub();
        let open = hub.subscribe(1).unwrap();
        hub.connection_reporter().send_replace(false);
        assert!(!*open.connected.borrow());
        assert_eq!(hub.subscribe(2).err(), Some(ChannelDown));
        hub.connection_reporter().send_replace(true);
        assert!(hub.subscribe(2).is_ok());
    }

    #[test]
    fn events_survive_the_trip_through_json() {
        let event = logged(MessageChange::Read, 4, 5);
        let hub = local_hub();
        let mut recipient = hub.subscribe(5).unwrap();
        let from_elsewhere = Outgoing {
            origin: hub.origin.wrapping_add(1),
            event: &event,
        };
        hub.deliver_payload(&serde_json::to_string(&from_elsewhere).unwrap());
        assert_eq!(*recipient.receiver.try_recv().unwrap(), event);
    }

    #[test]
    fn an_instance_ignores_its_own_events_coming_back() {
        let event = logged(MessageChange::Created, 4, 5);
        let hub = local_hub();
        let mut recipient = hub.subscribe(5).unwrap();
        let own = Outgoing {
            origin: hub.origin,
            event: &event,
        };
        hub.deliver_payload(&serde_json::to_string(&own).unwrap());
        assert!(recipient.receiver.try_recv().is_err());
    }
}

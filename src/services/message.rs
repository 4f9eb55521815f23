//! MessageService: user-to-user messages, conversations and the live stream.
//!
//! Privacy rule: a message exists only for its sender and its recipient; to
//! anyone else every RPC answers exactly as for a missing id.

use std::{collections::VecDeque, sync::Arc, time::Duration};

use tokio::sync::broadcast::error::RecvError;
use tonic::{Request, Response, Status, codegen::BoxStream};

use super::{AppState, Caller, convert::message_to_proto};
use crate::{
    domain::{
        Violations,
        message::{
            MAX_MARK_READ_IDS, RECIPIENT_DISABLED, default_conversation_id, parse_content,
            parse_conversation_id, parse_request_id, parse_search_query, request_fingerprint,
        },
        paging::{PageScope, page_size},
    },
    error::{AppError, Reason, refusal},
    events::{HubEvent, MessageChange},
    proto::{self, message_service_server::MessageService, stream_messages_response::Event},
    storage::{
        Before, LoggedChange, MessageEvent, MessageFilter, MessageRecord, NewMessage, RequestKey,
    },
};

const MESSAGE_NOT_FOUND: &str = "message not found";
/// Streams re-check their session this often even without a revocation
/// notice, in case one was missed while the database connection was down.
const SESSION_RECHECK: Duration = Duration::from_secs(30);
/// Events read from the log per query while a stream catches up.
const REPLAY_PAGE: i64 = 500;
/// How long a stream waits before reading the log again after a failed read.
const REPLAY_RETRY: Duration = Duration::from_millis(250);

pub struct MessageApi {
    state: Arc<AppState>,
}

fn visible_to(message: &MessageRecord, user_id: i64) -> bool {
    message.sender_id == user_id || message.recipient_id == user_id
}

/// Splits off the extra item fetched to learn whether another page follows.
fn take_page<T>(
    mut items: Vec<T>,
    limit: i64,
    cursor: impl Fn(&T) -> Vec<i64>,
    scope: &PageScope<'_>,
) -> (Vec<T>, String) {
    let limit = usize::try_from(limit).unwrap_or(usize::MAX);
    if items.len() <= limit {
        return (items, String::new());
    }
    items.truncate(limit);
    let token = items
        .last()
        .map(|last| scope.encode(&cursor(last)))
        .unwrap_or_default();
    (items, token)
}

fn before(cursor: Option<Vec<i64>>) -> Before {
    match cursor.as_deref() {
        Some([created_at, id]) => Before {
            created_at: *created_at,
            id: *id,
        },
        _ => Before::START,
    }
}

impl MessageApi {
    pub fn new(state: Arc<AppState>) -> Self {
        Self { state }
    }

    /// The message, if the caller may see it; `NOT_FOUND` otherwise.
    async fn visible_message(
        &self,
        caller: &Caller,
        message_id: i64,
    ) -> Result<MessageRecord, AppError> {
        self.state
            .db
            .find_message(message_id)
            .await?
            .filter(|message| visible_to(message, caller.user.id))
            .ok_or_else(|| AppError::NotFound(MESSAGE_NOT_FOUND.into()))
    }

    async fn require_recipient(&self, recipient_id: i64) -> Result<(), AppError> {
        let recipient = self
            .state
            .db
            .find_user(recipient_id)
            .await?
            .ok_or_else(|| AppError::NotFound("recipient not found".into()))?;
        if !recipient.is_active {
            return Err(AppError::refused(
                Reason::RecipientDisabled,
                RECIPIENT_DISABLED,
            ));
        }
        Ok(())
    }

    async fn send(
        &self,
        request: Request<proto::SendMessageRequest>,
    ) -> Result<MessageRecord, AppError> {
        let caller = self.state.authenticate(&request).await?;
        let body = request.into_inner();
        let mut violations = Violations::default();
        let content = violations.check(parse_content(&body.content));
        let explicit_conversation = body
            .conversation_id
            .as_deref()
            .and_then(|id| violations.check(parse_conversation_id(id)));
        let request_id = body
            .request_id
            .as_deref()
            .and_then(|id| violations.check(parse_request_id(id)));
        let content = violations.finish(content)?;
        let request = request_id.map(|request_id| RequestKey {
            fingerprint: request_fingerprint(
                body.recipient_id,
                &content,
                body.parent_id,
                body.conversation_id.as_deref(),
            ),
            request_id,
        });

        let me = caller.user.id;
        let recipient_id = body.recipient_id;
        let conversation_id = match body.parent_id {
            Some(parent_id) => {
                // Checked here too (the writer checks again) so that a
                // missing recipient is reported before anything about the parent.
                self.require_recipient(recipient_id).await?;
                let parent = self
                    .visible_message(&caller, parent_id)
                    .await
                    .map_err(|_| AppError::NotFound("parent message not found".into()))?;
                let pair = |a: i64, b: i64| (a.min(b), a.max(b));
                if pair(parent.sender_id, parent.recipient_id) != pair(me, recipient_id) {
                    return Err(AppError::invalid(
                        "parent_id",
                        "belongs to a conversation with another user",
                    ));
                }
                if explicit_conversation
                    .as_ref()
                    .is_some_and(|explicit| *explicit != parent.conversation_id)
                {
                    return Err(AppError::invalid(
                        "conversation_id",
                        "differs from the conversation of the parent message",
                    ));
                }
                parent.conversation_id
            }
            None => {
                explicit_conversation.unwrap_or_else(|| default_conversation_id(me, recipient_id))
            }
        };
        // The writer stores the message only if the recipient exists and is
        // active, in the same transaction.
        let stored = self
            .state
            .message_writer
            .insert(NewMessage {
                sender_id: me,
                recipient_id,
                content,
                parent_id: body.parent_id,
                conversation_id,
                now: self.state.clock.now().micros(),
                request,
            })
            .await?;
        let message = stored.message.clone();
        self.publish(stored);
        Ok(message)
    }

    /// Hands a committed change to every open stream of its audience; a
    /// change that logged nothing (an idempotent send's retry) emits nothing.
    fn publish(&self, change: LoggedChange) {
        if !change.event_ids.is_empty() {
            self.state.events.publish(HubEvent::Message(change));
        }
    }

    /// The caller's message, refused to its recipient and unknown to others.
    async fn own_message(
        &self,
        caller: &Caller,
        message_id: i64,
        verb: &str,
    ) -> Result<MessageRecord, AppError> {
        let message = self.visible_message(caller, message_id).await?;
        if message.sender_id != caller.user.id {
            return Err(AppError::refused(
                Reason::NotMessageSender,
                format!("only the sender may {verb} a message"),
            ));
        }
        Ok(message)
    }

    async fn list(
        &self,
        request: Request<proto::ListMessagesRequest>,
    ) -> Result<proto::ListMessagesResponse, AppError> {
        let caller = self.state.authenticate(&request).await?;
        let body = request.into_inner();
        let mut violations = Violations::default();
        let limit = violations.check(page_size(body.page_size));
        let conversation_id = body
            .conversation_id
            .as_deref()
            .and_then(|id| violations.check(parse_conversation_id(id)));
        let with_user = body
            .with_user_id
            .map(|id| id.to_string())
            .unwrap_or_default();
        let unread = if body.unread_only { "unread" } else { "" };
        let conversation_filter = conversation_id.clone().unwrap_or_default();
        let parent = body.parent_id.map(|id| id.to_string()).unwrap_or_default();
        let scope = PageScope {
            rpc: "ListMessages",
            caller_id: caller.user.id,
            filters: &[&with_user, &conversation_filter, unread, &parent],
        };
        let cursor = violations.check(scope.decode(&body.page_token, 2));
        let limit = violations.finish(limit)?;
        if let Some(parent_id) = body.parent_id {
            self.visible_message(&caller, parent_id)
                .await
                .map_err(|_| AppError::NotFound("parent message not found".into()))?;
        }
        let filter = MessageFilter {
            with_user_id: body.with_user_id,
            conversation_id,
            unread_only: body.unread_only,
            parent_id: body.parent_id,
        };
        let page = self
            .state
            .db
            .list_messages(caller.user.id, &filter, before(cursor.flatten()), limit + 1)
            .await?;
        let (messages, next_page_token) =
            take_page(page.messages, limit, |m| vec![m.created_at, m.id], &scope);
        Ok(proto::ListMessagesResponse {
            messages: messages.into_iter().map(message_to_proto).collect(),
            next_page_token,
            last_event_id: page.last_event_id,
        })
    }

    async fn search(
        &self,
        request: Request<proto::SearchMessagesRequest>,
    ) -> Result<proto::SearchMessagesResponse, AppError> {
        let caller = self.state.authenticate(&request).await?;
        let body = request.into_inner();
        let mut violations = Violations::default();
        let limit = violations.check(page_size(body.page_size));
        let query = violations.check(parse_search_query(&body.query));
        let scope = PageScope {
            rpc: "SearchMessages",
            caller_id: caller.user.id,
            filters: &[&body.query],
        };
        let cursor = violations.check(scope.decode(&body.page_token, 2));
        let limit = violations.finish(limit)?;
        let query = query.unwrap_or_default();
        let messages = self
            .state
            .db
            .search_messages(caller.user.id, &query, before(cursor.flatten()), limit + 1)
            .await?;
        let (messages, next_page_token) =
            take_page(messages, limit, |m| vec![m.created_at, m.id], &scope);
        Ok(proto::SearchMessagesResponse {
            messages: messages.into_iter().map(message_to_proto).collect(),
            next_page_token,
        })
    }

    async fn conversations(
        &self,
        request: Request<proto::ListConversationsRequest>,
    ) -> Result<proto::ListConversationsResponse, AppError> {
        let caller = self.state.authenticate(&request).await?;
        let body = request.into_inner();
        let mut violations = Violations::default();
        let limit = violations.check(page_size(body.page_size));
        let scope = PageScope {
            rpc: "ListConversations",
            caller_id: caller.user.id,
            filters: &[],
        };
        let cursor = violations.check(scope.decode(&body.page_token, 2));
        let limit = violations.finish(limit)?;
        // The position first: every event up to it is then in the page.
        let last_event_id = self.state.db.latest_event_id(caller.user.id).await?;
        let conversations = self
            .state
            .db
            .list_conversations(caller.user.id, before(cursor.flatten()), limit + 1)
            .await?;
        let (conversations, next_page_token) = take_page(
            conversations,
            limit,
            |c| vec![c.last_message.created_at, c.last_message.id],
            &scope,
        );
        Ok(proto::ListConversationsResponse {
            conversations: conversations
                .into_iter()
                .map(|conversation| proto::Conversation {
                    conversation_id: conversation.last_message.conversation_id.clone(),
                    other_user_id: conversation.other_user_id,
                    last_message: Some(message_to_proto(conversation.last_message)),
                    unread_count: conversation.unread_count,
                })
                .collect(),
            next_page_token,
            last_event_id,
        })
    }

    async fn mark_read(&self, request: Request<proto::MarkReadRequest>) -> Result<i32, AppError> {
        let caller = self.state.authenticate(&request).await?;
        let ids = request.into_inner().message_ids;
        if ids.len() > MAX_MARK_READ_IDS {
            return Err(AppError::invalid(
                "message_ids",
                "must hold at most 1000 ids",
            ));
        }
        let changed = self
            .state
            .db
            .mark_read(caller.user.id, &ids, self.state.clock.now().micros())
            .await?;
        Ok(self.publish_all(changed))
    }

    async fn mark_conversation_read(
        &self,
        request: Request<proto::MarkConversationReadRequest>,
    ) -> Result<i32, AppError> {
        let caller = self.state.authenticate(&request).await?;
        let body = request.into_inner();
        let conversation_id = parse_conversation_id(&body.conversation_id)?;
        let changed = self
            .state
            .db
            .mark_conversation_read(
                caller.user.id,
                body.other_user_id,
                &conversation_id,
                self.state.clock.now().micros(),
            )
            .await?;
        Ok(self.publish_all(changed))
    }

    /// Publishes each change in order; answers how many there were.
    fn publish_all(&self, changes: Vec<LoggedChange>) -> i32 {
        let count = i32::try_from(changes.len()).unwrap_or(i32::MAX);
        for change in changes {
            self.publish(change);
        }
        count
    }

    async fn delete(&self, request: Request<proto::DeleteMessageRequest>) -> Result<(), AppError> {
        let caller = self.state.authenticate(&request).await?;
        let message = self
            .own_message(&caller, request.get_ref().message_id, "delete")
            .await?;
        let deleted = self
            .state
            .db
            .delete_message(message.id, caller.user.id, self.state.clock.now().micros())
            .await?
            .ok_or_else(|| AppError::NotFound(MESSAGE_NOT_FOUND.into()))?;
        self.publish(deleted);
        Ok(())
    }

    async fn edit(
        &self,
        request: Request<proto::EditMessageRequest>,
    ) -> Result<MessageRecord, AppError> {
        let caller = self.state.authenticate(&request).await?;
        let body = request.into_inner();
        let content = parse_content(&body.content)?;
        let message = self.own_message(&caller, body.message_id, "edit").await?;
        let edited = self
            .state
            .db
            .edit_message(
                message.id,
                caller.user.id,
                &content,
                self.state.clock.now().micros(),
            )
            .await?
            .ok_or_else(|| AppError::NotFound(MESSAGE_NOT_FOUND.into()))?;
        let message = edited.message.clone();
        self.publish(edited);
        Ok(message)
    }

    /// Where a new stream starts: after the cursor, once it is checked
    /// (a replay follows), or at the caller's newest event.
    async fn starting_point(
        &self,
        user_id: i64,
        after_event_id: Option<i64>,
    ) -> Result<(i64, bool), AppError> {
        let head = self.state.db.latest_event_id(user_id).await?;
        let Some(cursor) = after_event_id else {
            return Ok((head, false));
        };
        if cursor < 0 {
            return Err(AppError::invalid("after_event_id", "must not be negative"));
        }
        if cursor > head {
            return Err(cursor_expired());
        }
        if cursor < head
            && !self
                .state
                .db
                .event_retained(user_id, cursor + 1, retained_since(&self.state))
                .await?
        {
            return Err(cursor_expired());
        }
        Ok((cursor, cursor < head))
    }

    /// The stream's next response, or `None` once it has ended. Polled by
    /// tonic itself (no task or channel of its own), so an idle stream costs
    /// only this state; a client that goes away drops it.
    ///
    /// Every event carries its id in the user's log, and ids are dense, so
    /// the stream always knows whether the next live event is the one it
    /// expects: a gap (an event still on its way from another instance, or
    /// missed) is filled from the log, and anything already delivered
    /// (replayed, then heard live) is skipped. Replay and live meet with no
    /// gap and no duplicate.
    async fn next_response(
        feed: &mut StreamFeed,
    ) -> Option<Result<proto::StreamMessagesResponse, Status>> {
        let session_ended = || {
            refusal(
                Reason::SessionRevoked,
                crate::auth::authenticator::SESSION_ENDED,
                None,
            )
        };
        let state = Arc::clone(&feed.state);
        let (session_id, user_id) = (feed.session_id, feed.user_id);
        let ending = loop {
            if feed.ended {
                return None;
            }
            if let Some(event) = feed.backlog.pop_front() {
                feed.last = event.event_id;
                return Some(Ok(stream_response(event)));
            }
            if feed.catching_up {
                match state.db.events_after(user_id, feed.last, REPLAY_PAGE).await {
                    Ok(events) => {
                        // Ids are dense: a hole means events were erased
                        // (retention, a deleted user) and the client must resync.
                        let expected = feed.last + 1;
                        if events
                            .first()
                            .is_some_and(|first| first.event_id != expected)
                        {
                            break Some(cursor_expired().into());
                        }
                        let read = events.len();
                        let mut next = expected;
                        for event in events {
                            if event.event_id != next {
                                break;
                            }
                            next += 1;
                            feed.backlog.push_back(event);
                        }
                        // The whole rest of the log, without a hole: live
                        // events go on from here; those that overflowed the
                        // channel meanwhile are in the log.
                        let whole = usize::try_from(REPLAY_PAGE).is_ok_and(|page| read < page);
                        if whole && next - expected == i64::try_from(read).unwrap_or(i64::MAX) {
                            feed.catching_up = false;
                            feed.forgive_lag = true;
                        }
                        continue;
                    }
                    // The database is away: the log keeps what happens meanwhile.
                    Err(error) => {
                        tracing::debug!(error = %error, "stream replay read failed; retrying");
                        tokio::select! {
                            () = tokio::time::sleep(REPLAY_RETRY) => continue,
                            _ = feed.shutdown.changed() => break Some(shutting_down()),
                            () = tokio::time::sleep_until(feed.expires) => break Some(session_ended()),
                        }
                    }
                }
            }
            tokio::select! {
                received = feed.subscription.receiver.recv() => match received {
                    Ok(event) => match &*event {
                        HubEvent::Message(change) => {
                            feed.forgive_lag = false;
                            let Some(event_id) = change.event_id_for(user_id) else { continue };
                            if event_id <= feed.last {
                                continue;
                            }
                            if event_id > feed.last + 1 {
                                feed.catching_up = true;
                                continue;
                            }
                            feed.last = event_id;
                            return Some(Ok(stream_response(MessageEvent {
                                event_id,
                                change: change.change,
                                message: change.message.clone(),
                            })));
                        }
                        // A failed check (database down) is retried at the next recheck.
                        HubEvent::AllUsersChanged => {}
                        HubEvent::UserChanged { .. } => {
                            if matches!(state.auth.session_is_live(session_id, user_id, state.clock.now()).await, Ok(false)) {
                                break Some(session_ended());
                            }
                        }
                    },
                    // Overflowed while the stream read the log: the log has it all.
                    Err(RecvError::Lagged(_)) if feed.forgive_lag => {
                        feed.forgive_lag = false;
                        feed.catching_up = true;
                    }
                    Err(RecvError::Lagged(missed)) => {
                        break Some(refusal(
                            Reason::StreamLagged,
                            format!(
                                "the stream fell {missed} events behind and was closed; \
                                 resume from the last event_id received"
                            ),
                            None,
                        ));
                    }
                    Err(RecvError::Closed) => break None,
                },
                () = tokio::time::sleep_until(feed.next_recheck) => {
                    feed.next_recheck = tokio::time::Instant::now() + SESSION_RECHECK;
                    if matches!(state.auth.session_is_live(session_id, user_id, state.clock.now()).await, Ok(false)) {
                        break Some(session_ended());
                    }
                    // An event whose notice never came (a failed publish) is
                    // picked up from the log here at the latest.
                    if state.db.latest_event_id(user_id).await.is_ok_and(|head| head > feed.last) {
                        feed.catching_up = true;
                    }
                }
                () = tokio::time::sleep_until(feed.expires) => break Some(session_ended()),
                _ = feed.shutdown.changed() => break Some(shutting_down()),
                () = crate::events::channel_lost(&mut feed.subscription.connected) => {
                    break Some(Status::unavailable(
                        "real-time events were interrupted and some may be missing; \
                         resume from the last event_id received",
                    ));
                }
            }
        };
        feed.ended = true;
        ending.map(Err)
    }
}

/// A cursor some of whose following events are gone, or that was never
/// issued: the client must resync.
fn cursor_expired() -> AppError {
    AppError::refused(
        Reason::CursorExpired,
        "events after this cursor are no longer kept, or it was never issued; \
         list messages to resync, then stream from their last_event_id",
    )
}

/// The oldest time whose events are still retained, at the server's "now".
fn retained_since(state: &AppState) -> i64 {
    let retention = i64::try_from(state.config.event_retention.as_micros()).unwrap_or(i64::MAX);
    state.clock.now().micros().saturating_sub(retention)
}

fn shutting_down() -> Status {
    Status::unavailable("the server is shutting down; resume from the last event_id received")
}

/// One logged event as the stream sends it.
fn stream_response(event: MessageEvent) -> proto::StreamMessagesResponse {
    let message = message_to_proto(event.message);
    proto::StreamMessagesResponse {
        event: Some(match event.change {
            MessageChange::Created => Event::Created(message),
            MessageChange::Read => Event::Read(message),
            MessageChange::Deleted => Event::Deleted(message),
            MessageChange::Edited => Event::Edited(message),
        }),
        event_id: event.event_id,
    }
}

/// What one open StreamMessages call holds between events.
struct StreamFeed {
    /// Counts the stream in `ai_message_streams_open` while it lives.
    _open: crate::metrics::StreamGuard,
    state: Arc<AppState>,
    subscription: crate::events::Subscription,
    session_id: i64,
    user_id: i64,
    /// The id of the last event delivered (or the starting point).
    last: i64,
    /// Events read from the log, to deliver in order before anything live.
    backlog: VecDeque<MessageEvent>,
    /// Whether the log must be read before going on live (a replay, a gap).
    catching_up: bool,
    /// Set once a replay caught up: live events that overflowed the channel
    /// during it are in the log, so a lag then is read from there instead
    /// of ending the stream.
    forgive_lag: bool,
    expires: tokio::time::Instant,
    next_recheck: tokio::time::Instant,
    shutdown: tokio::sync::watch::Receiver<bool>,
    ended: bool,
}

#[tonic::async_trait]
impl MessageService for MessageApi {
    async fn send_message(
        &self,
        request: Request<proto::SendMessageRequest>,
    ) -> Result<Response<proto::SendMessageResponse>, Status> {
        let message = self.send(request).await?;
        Ok(Response::new(proto::SendMessageResponse {
            message: Some(message_to_proto(message)),
        }))
    }

    async fn get_message(
        &self,
        request: Request<proto::GetMessageRequest>,
    ) -> Result<Response<proto::GetMessageResponse>, Status> {
        let caller = self.state.authenticate(&request).await?;
        let message = self
            .visible_message(&caller, request.get_ref().message_id)
            .await?;
        Ok(Response::new(proto::GetMessageResponse {
            message: Some(message_to_proto(message)),
        }))
    }

    async fn list_messages(
        &self,
        request: Request<proto::ListMessagesRequest>,
    ) -> Result<Response<proto::ListMessagesResponse>, Status> {
        Ok(Response::new(self.list(request).await?))
    }

    async fn list_conversations(
        &self,
        request: Request<proto::ListConversationsRequest>,
    ) -> Result<Response<proto::ListConversationsResponse>, Status> {
        Ok(Response::new(self.conversations(request).await?))
    }

    async fn mark_read(
        &self,
        request: Request<proto::MarkReadRequest>,
    ) -> Result<Response<proto::MarkReadResponse>, Status> {
        let updated_count = MessageApi::mark_read(self, request).await?;
        Ok(Response::new(proto::MarkReadResponse { updated_count }))
    }

    async fn delete_message(
        &self,
        request: Request<proto::DeleteMessageRequest>,
    ) -> Result<Response<proto::DeleteMessageResponse>, Status> {
        self.delete(request).await?;
        Ok(Response::new(proto::DeleteMessageResponse {}))
    }

    async fn edit_message(
        &self,
        request: Request<proto::EditMessageRequest>,
    ) -> Result<Response<proto::EditMessageResponse>, Status> {
        let message = self.edit(request).await?;
        Ok(Response::new(proto::EditMessageResponse {
            message: Some(message_to_proto(message)),
        }))
    }

    async fn get_unread_count(
        &self,
        request: Request<proto::GetUnreadCountRequest>,
    ) -> Result<Response<proto::GetUnreadCountResponse>, Status> {
        let caller = self.state.authenticate(&request).await?;
        let total = self
            .state
            .db
            .unread_count(caller.user.id)
            .await
            .map_err(AppError::from)?;
        Ok(Response::new(proto::GetUnreadCountResponse { total }))
    }

    async fn mark_conversation_read(
        &self,
        request: Request<proto::MarkConversationReadRequest>,
    ) -> Result<Response<proto::MarkConversationReadResponse>, Status> {
        let updated_count = MessageApi::mark_conversation_read(self, request).await?;
        Ok(Response::new(proto::MarkConversationReadResponse {
            updated_count,
        }))
    }

    async fn search_messages(
        &self,
        request: Request<proto::SearchMessagesRequest>,
    ) -> Result<Response<proto::SearchMessagesResponse>, Status> {
        Ok(Response::new(self.search(request).await?))
    }

    async fn stream_messages(
        &self,
        request: Request<proto::StreamMessagesRequest>,
    ) -> Result<Response<BoxStream<proto::StreamMessagesResponse>>, Status> {
        let caller = self.state.authenticate(&request).await?;
        // Subscribed before the starting point is read (so nothing committed
        // after it is missed) and before the response (and its headers)
        // leaves, and never while events from other instances could be missing.
        let subscription =
            self.state.events.subscribe(caller.user.id).map_err(|_| {
                Status::unavailable("real-time events are interrupted; retry shortly")
            })?;
        let (last, catching_up) = self
            .starting_point(caller.user.id, request.get_ref().after_event_id)
            .await?;
        let now = tokio::time::Instant::now();
        let until_expiry = caller.session_time_left(self.state.clock.now());
        let feed = StreamFeed {
            _open: self.state.metrics.stream_opened("StreamMessages"),
            state: Arc::clone(&self.state),
            subscription,
            session_id: caller.session_id,
            user_id: caller.user.id,
            last,
            backlog: VecDeque::new(),
            catching_up,
            forgive_lag: false,
            expires: now + until_expiry,
            next_recheck: now + SESSION_RECHECK,
            shutdown: self.state.shutdown.clone(),
            ended: false,
        };
        let stream = futures::stream::unfold(feed, |mut feed| async move {
            let response = Self::next_response(&mut feed).await?;
            Some((response, feed))
        });
        Ok(Response::new(Box::pin(stream)))
    }
}

/// How often message events past retention and spent request ids are swept.
const LOG_SWEEP_INTERVAL: Duration = Duration::from_secs(60);

/// Deletes the message events past retention and the request ids older than
/// 24 hours, at the server's "now".
pub async fn sweep_log_once(state: &AppState) {
    let requests_before = state.clock.now().micros() - crate::storage::REQUEST_ID_LIFETIME_MICROS;
    match state
        .db
        .sweep_message_log(retained_since(state), requests_before)
        .await
    {
        Ok(0) => {}
        Ok(swept) => tracing::debug!(swept, "message log rows past retention deleted"),
        Err(error) => tracing::warn!(error = %error, "message log sweep failed; retrying later"),
    }
}

/// Sweeps every minute (or every retention period, if shorter) until `stop`
/// turns true.
pub async fn sweep_log_regularly(state: Arc<AppState>, stop: tokio::sync::watch::Receiver<bool>) {
    let period = LOG_SWEEP_INTERVAL.min(state.config.event_retention.max(Duration::from_secs(1)));
    super::every(period, stop, || sweep_log_once(&state)).await;
}

/// How often new messages are added to the text index (where the database
/// keeps it apart from the writes).
const TEXT_INDEX_INTERVAL: Duration = Duration::from_millis(250);

/// Keeps the text index of SearchMessages caught up until `stop` turns true.
pub async fn index_text_regularly(state: Arc<AppState>, stop: tokio::sync::watch::Receiver<bool>) {
    super::every(TEXT_INDEX_INTERVAL, stop, || async {
        if let Err(error) = state.db.index_text().await {
            tracing::debug!(error = %error, "text indexing failed; retrying later");
        }
    })
    .await;
}

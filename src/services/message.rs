//! MessageService: user-to-user messages, conversations and the live stream.
//!
//! Privacy rule: a message exists only for its sender and its recipient; to
//! anyone else every RPC answers exactly as for a missing id.

use std::{sync::Arc, time::Duration};

use tokio::sync::broadcast::error::RecvError;
use tonic::{Request, Response, Status, codegen::BoxStream};

use super::{AppState, Caller, convert::message_to_proto};
use crate::{
    domain::{
        Violations,
        message::{
            MAX_MARK_READ_IDS, RECIPIENT_DISABLED, default_conversation_id, parse_content,
            parse_conversation_id,
        },
        paging::{PageScope, page_size},
    },
    error::{AppError, Reason, refusal},
    events::{HubEvent, MessageChange},
    proto::{self, message_service_server::MessageService, stream_messages_response::Event},
    storage::{Before, MessageFilter, MessageRecord, NewMessage},
};

const MESSAGE_NOT_FOUND: &str = "message not found";
/// Streams re-check their session this often even without a revocation
/// notice, in case one was missed while the database connection was down.
const SESSION_RECHECK: Duration = Duration::from_secs(30);

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
        let content = violations.finish(content)?;

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
        let message = self
            .state
            .message_writer
            .insert(NewMessage {
                sender_id: me,
                recipient_id,
                content,
                parent_id: body.parent_id,
                conversation_id,
                now: self.state.clock.now().micros(),
            })
            .await?;
        self.state
            .events
            .publish(HubEvent::Message {
                change: MessageChange::Created,
                message: message.clone(),
            })
            .await;
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
        let scope = PageScope {
            rpc: "ListMessages",
            caller_id: caller.user.id,
            filters: &[&with_user, &conversation_filter, unread],
        };
        let cursor = violations.check(scope.decode(&body.page_token, 2));
        let limit = violations.finish(limit)?;
        let filter = MessageFilter {
            with_user_id: body.with_user_id,
            conversation_id,
            unread_only: body.unread_only,
        };
        let messages = self
            .state
            .db
            .list_messages(caller.user.id, &filter, before(cursor.flatten()), limit + 1)
            .await?;
        let (messages, next_page_token) =
            take_page(messages, limit, |m| vec![m.created_at, m.id], &scope);
        Ok(proto::ListMessagesResponse {
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
        let count = i32::try_from(changed.len()).unwrap_or(i32::MAX);
        for message in changed {
            self.state
                .events
                .publish(HubEvent::Message {
                    change: MessageChange::Read,
                    message,
                })
                .await;
        }
        Ok(count)
    }

    async fn delete(&self, request: Request<proto::DeleteMessageRequest>) -> Result<(), AppError> {
        let caller = self.state.authenticate(&request).await?;
        let message = self
            .visible_message(&caller, request.get_ref().message_id)
            .await?;
        if message.sender_id != caller.user.id {
            return Err(AppError::refused(
                Reason::NotMessageSender,
                "only the sender may delete a message",
            ));
        }
        let deleted = self
            .state
            .db
            .delete_message(message.id, caller.user.id)
            .await?
            .ok_or_else(|| AppError::NotFound(MESSAGE_NOT_FOUND.into()))?;
        self.state
            .events
            .publish(HubEvent::Message {
                change: MessageChange::Deleted,
                message: deleted,
            })
            .await;
        Ok(())
    }

    /// Feeds one subscriber until the client leaves, the session ends, the
    /// subscriber lags, or the server shuts down.
    /// The stream's next response, or `None` once it has ended. Polled by
    /// tonic itself (no task or channel of its own), so an idle stream costs
    /// only this state; a client that goes away drops it.
    async fn next_response(
        feed: &mut StreamFeed,
    ) -> Option<Result<proto::StreamMessagesResponse, Status>> {
        if feed.ended {
            return None;
        }
        let session_ended = || {
            refusal(
                Reason::SessionRevoked,
                crate::auth::authenticator::SESSION_ENDED,
                None,
            )
        };
        let state = &feed.state;
        let (session_id, user_id) = (feed.session_id, feed.user_id);
        let ending = loop {
            tokio::select! {
                received = feed.subscription.receiver.recv() => match received {
                    Ok(event) => match &*event {
                        HubEvent::Message { change, message } => {
                            let message = message_to_proto(message.clone());
                            let event = match change {
                                MessageChange::Created => Event::Created(message),
                                MessageChange::Read => Event::Read(message),
                                MessageChange::Deleted => Event::Deleted(message),
                            };
                            return Some(Ok(proto::StreamMessagesResponse { event: Some(event) }));
                        }
                        // A failed check (database down) is retried at the next recheck.
                        HubEvent::AllUsersChanged => {}
                        HubEvent::UserChanged { .. } => {
                            if matches!(state.auth.session_is_live(session_id, user_id, state.clock.now()).await, Ok(false)) {
                                break Some(session_ended());
                            }
                        }
                    },
                    Err(RecvError::Lagged(missed)) => {
                        break Some(refusal(
                            Reason::StreamLagged,
                            format!(
                                "the stream fell {missed} events behind and was closed; \
                                 list messages to catch up, then subscribe again"
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
                }
                () = tokio::time::sleep_until(feed.expires) => break Some(session_ended()),
                _ = feed.shutdown.changed() => {
                    break Some(Status::unavailable("the server is shutting down; reconnect"));
                }
                () = crate::events::channel_lost(&mut feed.subscription.connected) => {
                    break Some(Status::unavailable(
                        "real-time events were interrupted and some may be missing; \
                         list messages to catch up, then subscribe again",
                    ));
                }
            }
        };
        feed.ended = true;
        ending.map(Err)
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

    async fn stream_messages(
        &self,
        request: Request<proto::StreamMessagesRequest>,
    ) -> Result<Response<BoxStream<proto::StreamMessagesResponse>>, Status> {
        let caller = self.state.authenticate(&request).await?;
        // Subscribed before the response (and its headers) leaves, and never
        // while events from other instances could be missing.
        let subscription =
            self.state.events.subscribe(caller.user.id).map_err(|_| {
                Status::unavailable("real-time events are interrupted; retry shortly")
            })?;
        let now = tokio::time::Instant::now();
        let until_expiry = caller.session_time_left(self.state.clock.now());
        let feed = StreamFeed {
            _open: self.state.metrics.stream_opened("StreamMessages"),
            state: Arc::clone(&self.state),
            subscription,
            session_id: caller.session_id,
            user_id: caller.user.id,
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

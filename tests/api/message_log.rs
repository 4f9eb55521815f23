//! Messaging that never loses an event: event ids and resumable streams,
//! snapshots with their position, idempotent sends, edits, threads, unread
//! counts and search, on one instance and (PostgreSQL) across two.

use std::{collections::HashSet, sync::Arc, time::Duration};

use ai_message::proto::{self, stream_messages_response::Event};
use tonic::{Code, Status, Streaming};

use crate::{
    errors::assert_reason,
    helpers::{
        Backend, LoggedIn, TestApp, assert_code, bad_request_fields, spawn_app, spawn_app_on_clock,
        with_bearer,
    },
    message::{list, list_all, send, text},
};

backend_tests!(
    a_client_that_misses_a_hundred_messages_resumes_with_exactly_those_then_live_ones,
    a_stream_resumed_on_another_instance_misses_nothing,
    cursors_past_retention_or_never_issued_are_cursor_expired,
    a_deleted_users_messages_are_erased_from_every_log,
    ten_concurrent_retries_of_one_request_id_store_one_message_and_emit_one_event,
    a_request_id_reused_for_another_message_is_refused,
    list_then_stream_from_last_event_id_loses_nothing_under_concurrent_sends,
    only_the_sender_edits_and_the_replay_shows_every_version,
    threads_list_direct_replies_and_reply_counts_follow_deletes,
    reply_and_unread_counts_stay_exact_under_concurrent_writes,
    search_finds_substrings_ignoring_ascii_case_pages_and_never_shows_others,
    search_uses_the_text_index,
);

const SOON: Duration = Duration::from_secs(5);

async fn stream_after(
    app: &TestApp,
    who: &LoggedIn,
    after_event_id: Option<i64>,
) -> Result<Streaming<proto::StreamMessagesResponse>, Status> {
    app.messages
        .clone()
        .stream_messages(with_bearer(
            proto::StreamMessagesRequest { after_event_id },
            &who.access_token,
        ))
        .await
        .map(tonic::Response::into_inner)
}

/// The next event and its id, or `None` if nothing came within `within`.
async fn next(
    stream: &mut Streaming<proto::StreamMessagesResponse>,
    within: Duration,
) -> Option<(i64, Event)> {
    match tokio::time::timeout(within, stream.message()).await {
        Err(_) => None,
        Ok(Ok(Some(response))) => Some((response.event_id, response.event.unwrap())),
        Ok(other) => panic!("the stream ended: {other:?}"),
    }
}

pub fn message_of(event: &Event) -> &proto::Message {
    match event {
        Event::Created(m) | Event::Read(m) | Event::Deleted(m) | Event::Edited(m) => m,
    }
}

async fn latest_event_id(app: &TestApp, who: &LoggedIn) -> i64 {
    list(app, who, proto::ListMessagesRequest::default())
        .await
        .unwrap()
        .last_event_id
}

async fn unread_total(app: &TestApp, who: &LoggedIn) -> i64 {
    app.messages
        .clone()
        .get_unread_count(with_bearer(
            proto::GetUnreadCountRequest {},
            &who.access_token,
        ))
        .await
        .unwrap()
        .into_inner()
        .total
}

/// Sends `count` messages from `from` to `to`, one after another, each named
/// `{prefix} {i}`; returns their ids in order.
fn spawn_sender(
    app: &TestApp,
    from: &LoggedIn,
    to: i64,
    prefix: &'static str,
    count: usize,
) -> tokio::task::JoinHandle<Vec<i64>> {
    let mut messages = app.messages.clone();
    let token = from.access_token.clone();
    tokio::spawn(async move {
        let mut ids = Vec::with_capacity(count);
        for i in 0..count {
            let sent = messages
                .send_message(with_bearer(text(to, &format!("{prefix} {i}")), &token))
                .await
                .unwrap();
            ids.push(sent.into_inner().message.unwrap().id);
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        ids
    })
}

/// The resume scenario on `sending` (the missed messages and the live ones)
/// and `streaming` (the stream, dropped and resumed): the resumed stream
/// holds exactly the missed messages in order, then every live one, each
/// once, with dense event ids.
async fn resume_scenario(sending: &TestApp, streaming: &TestApp) {
    let ann = sending.register_and_login("ann").await;
    let carl = sending.register_and_login("carl").await;
    let bob = streaming.register_and_login("bob").await;
    let mut first = stream_after(streaming, &bob, None).await.unwrap();
    send(sending, &ann, text(bob.user_id, "seen"))
        .await
        .unwrap();
    let (cursor, seen) = next(&mut first, SOON).await.expect("the first event");
    assert_eq!(message_of(&seen).content, "seen");
    drop(first);

    let mut missed = Vec::new();
    for i in 0..100 {
        missed.push(
            send(sending, &ann, text(bob.user_id, &format!("missed {i}")))
                .await
                .unwrap()
                .id,
        );
    }
    // Another client keeps sending while bob reconnects.
    let live = spawn_sender(sending, &carl, bob.user_id, "live", 60);
    let mut resumed = stream_after(streaming, &bob, Some(cursor)).await.unwrap();
    let live = live.await.unwrap();

    let mut expected_id = cursor + 1;
    let mut replayed = Vec::new();
    let mut heard = Vec::new();
    while replayed.len() + heard.len() < missed.len() + live.len() {
        let (event_id, event) = next(&mut resumed, SOON)
            .await
            .unwrap_or_else(|| panic!("stalled after {} and {}", replayed.len(), heard.len()));
        assert_eq!(event_id, expected_id, "dense event ids, in order");
        expected_id += 1;
        let Event::Created(message) = event else {
            panic!("only sends happened: {event:?}")
        };
        if message.sender_id == ann.user_id {
            replayed.push(message.id);
        } else {
            heard.push(message.id);
        }
    }
    assert_eq!(replayed, missed, "exactly the missed messages, in order");
    assert_eq!(heard, live, "then every live one, once");
    assert!(
        next(&mut resumed, Duration::from_millis(300))
            .await
            .is_none(),
        "no duplicate after the seam"
    );
    send(sending, &ann, text(bob.user_id, "after"))
        .await
        .unwrap();
    let (event_id, event) = next(&mut resumed, SOON).await.unwrap();
    assert_eq!(
        (event_id, message_of(&event).content.as_str()),
        (expected_id, "after")
    );
}

async fn a_client_that_misses_a_hundred_messages_resumes_with_exactly_those_then_live_ones(
    backend: Backend,
) {
    let app = spawn_app(backend).await;
    resume_scenario(&app, &app).await;
    app.stop().await;
}

async fn a_stream_resumed_on_another_instance_misses_nothing(backend: Backend) {
    if backend == Backend::Sqlite {
        // One process owns an SQLite file: there is no second instance.
        return;
    }
    let first = spawn_app(backend).await;
    let second = first.spawn_sibling().await;
    resume_scenario(&first, &second).await;
    second.stop().await;
    first.stop().await;
}

async fn cursors_past_retention_or_never_issued_are_cursor_expired(backend: Backend) {
    let real_now = ai_message::domain::Clock::now(&ai_message::domain::SystemClock);
    let clock = Arc::new(ai_message::domain::ManualClock::starting_at(real_now));
    // Tokens and sessions outlive the retention here, so the clock can pass it.
    let app = spawn_app_on_clock(
        backend,
        |c| {
            c.event_retention = Duration::from_secs(3600);
            c.access_token_ttl = Duration::from_secs(24 * 3600);
        },
        clock.clone(),
    )
    .await;
    let ann = app.register_and_login("ann").await;
    let bob = app.register_and_login("bob").await;
    // Before any event: 0 is valid, 1 was never issued.
    assert!(stream_after(&app, &bob, Some(0)).await.is_ok());
    assert_reason(
        stream_after(&app, &bob, Some(1)).await,
        Code::FailedPrecondition,
        "CURSOR_EXPIRED",
    );
    for i in 0..3 {
        send(&app, &ann, text(bob.user_id, &format!("old {i}")))
            .await
            .unwrap();
    }
    let head = latest_event_id(&app, &bob).await;
    assert_eq!(head, 3);
    assert_reason(
        stream_after(&app, &bob, Some(head + 1)).await,
        Code::FailedPrecondition,
        "CURSOR_EXPIRED",
    );
    let status = assert_code(
        stream_after(&app, &bob, Some(-1)).await,
        Code::InvalidArgument,
    );
    assert_eq!(bad_request_fields(&status), ["after_event_id"]);
    let mut replay = stream_after(&app, &bob, Some(1)).await.unwrap();
    assert_eq!(next(&mut replay, SOON).await.unwrap().0, 2);
    drop(replay);

    // Two hours on: every event is past the hour of retention.
    clock.advance(Duration::from_secs(2 * 3600));
    for cursor in [0, 1, head - 1] {
        assert_reason(
            stream_after(&app, &bob, Some(cursor)).await,
            Code::FailedPrecondition,
            "CURSOR_EXPIRED",
        );
    }
    // The newest id stays valid however old: nothing happened since.
    let mut current = stream_after(&app, &bob, Some(head)).await.unwrap();
    assert!(
        next(&mut current, Duration::from_millis(200))
            .await
            .is_none()
    );
    let fresh = send(&app, &ann, text(bob.user_id, "new")).await.unwrap();
    let (event_id, event) = next(&mut current, SOON).await.unwrap();
    assert_eq!((event_id, message_of(&event).id), (head + 1, fresh.id));
    // The sweep deletes what is past retention and keeps the rest.
    ai_message::services::message::sweep_log_once(&app.state).await;
    assert_eq!(
        app.count(
            "SELECT COUNT(*) FROM message_events WHERE user_id = $1",
            bob.user_id
        )
        .await,
        1
    );
    app.stop().await;
}

async fn a_deleted_users_messages_are_erased_from_every_log(backend: Backend) {
    let app = spawn_app(backend).await;
    let root = app.superuser("root").await;
    let ann = app.register_and_login("ann").await;
    let bob = app.register_and_login("bob").await;
    let carl = app.register_and_login("carl").await;
    send(&app, &ann, text(bob.user_id, "from ann"))
        .await
        .unwrap();
    send(&app, &carl, text(bob.user_id, "from carl"))
        .await
        .unwrap();
    app.admin
        .clone()
        .delete_user(with_bearer(
            proto::DeleteUserRequest {
                user_id: ann.user_id,
            },
            &root.access_token,
        ))
        .await
        .unwrap();
    assert_eq!(
        app.count(
            "SELECT COUNT(*) FROM message_events WHERE sender_id = $1 OR recipient_id = $1",
            ann.user_id
        )
        .await,
        0
    );
    // Bob's first event is gone: a replay from before it must resync...
    assert_reason(
        stream_after(&app, &bob, Some(0)).await,
        Code::FailedPrecondition,
        "CURSOR_EXPIRED",
    );
    // ...while one from after it goes on.
    let mut replay = stream_after(&app, &bob, Some(1)).await.unwrap();
    let (event_id, event) = next(&mut replay, SOON).await.unwrap();
    assert_eq!(
        (event_id, message_of(&event).content.as_str()),
        (2, "from carl")
    );
    app.stop().await;
}

async fn ten_concurrent_retries_of_one_request_id_store_one_message_and_emit_one_event(
    backend: Backend,
) {
    let app = spawn_app(backend).await;
    // On PostgreSQL half the retries go through a second instance.
    let sibling = match backend {
        Backend::Postgres => Some(app.spawn_sibling().await),
        Backend::Sqlite => None,
    };
    let ann = app.register_and_login("ann").await;
    let bob = app.register_and_login("bob").await;
    let mut stream = stream_after(&app, &bob, None).await.unwrap();
    let request = proto::SendMessageRequest {
        request_id: Some("retry-me:1".into()),
        ..text(bob.user_id, "exactly once")
    };
    let retries: Vec<_> = (0..10)
        .map(|i| {
            let mut client = match (&sibling, i % 2) {
                (Some(sibling), 1) => sibling.messages.clone(),
                _ => app.messages.clone(),
            };
            let request = with_bearer(request.clone(), &ann.access_token);
            tokio::spawn(async move { client.send_message(request).await })
        })
        .collect();
    let mut ids = HashSet::new();
    for retry in retries {
        ids.insert(
            retry
                .await
                .unwrap()
                .unwrap()
                .into_inner()
                .message
                .unwrap()
                .id,
        );
    }
    assert_eq!(ids.len(), 1, "every retry answers the same message");
    assert_eq!(
        app.count(
            "SELECT COUNT(*) FROM messages WHERE sender_id = $1",
            ann.user_id
        )
        .await,
        1
    );
    let (_, event) = next(&mut stream, SOON).await.unwrap();
    assert!(ids.contains(&message_of(&event).id));
    assert!(
        next(&mut stream, Duration::from_millis(500))
            .await
            .is_none(),
        "one event only"
    );
    // Later retries too, as the message is now.
    app.messages
        .clone()
        .mark_read(with_bearer(
            proto::MarkReadRequest {
                message_ids: ids.iter().copied().collect(),
            },
            &bob.access_token,
        ))
        .await
        .unwrap();
    let again = send(&app, &ann, request.clone()).await.unwrap();
    assert!(ids.contains(&again.id));
    assert!(again.is_read, "as it is now");
    assert_eq!(
        latest_event_id(&app, &bob).await,
        2,
        "one created, one read"
    );
    if let Some(sibling) = sibling {
        sibling.stop().await;
    }
    app.stop().await;
}

async fn a_request_id_reused_for_another_message_is_refused(backend: Backend) {
    let app = spawn_app(backend).await;
    let ann = app.register_and_login("ann").await;
    let bob = app.register_and_login("bob").await;
    let carl = app.register_and_login("carl").await;
    let keyed = |to: i64, content: &str| proto::SendMessageRequest {
        request_id: Some("k1".into()),
        ..text(to, content)
    };
    let first = send(&app, &ann, keyed(bob.user_id, "one")).await.unwrap();
    for different in [
        keyed(bob.user_id, "two"),
        keyed(carl.user_id, "one"),
        proto::SendMessageRequest {
            conversation_id: Some("elsewhere".into()),
            ..keyed(bob.user_id, "one")
        },
        proto::SendMessageRequest {
            parent_id: Some(first.id),
            ..keyed(bob.user_id, "one")
        },
    ] {
        let status = assert_code(send(&app, &ann, different).await, Code::InvalidArgument);
        assert_eq!(bad_request_fields(&status), ["request_id"]);
    }
    // Request ids are the sender's own: another sender's is another message.
    let carls = send(&app, &carl, keyed(bob.user_id, "one")).await.unwrap();
    assert_ne!(carls.id, first.id);
    for bad in ["", "with space", &"x".repeat(101)] {
        let request = proto::SendMessageRequest {
            request_id: Some(bad.to_owned()),
            ..text(bob.user_id, "hi")
        };
        let status = assert_code(send(&app, &ann, request).await, Code::InvalidArgument);
        assert_eq!(bad_request_fields(&status), ["request_id"], "{bad:?}");
    }
    // Deleted since: the retry finds nothing and stores nothing.
    app.messages
        .clone()
        .delete_message(with_bearer(
            proto::DeleteMessageRequest {
                message_id: first.id,
            },
            &ann.access_token,
        ))
        .await
        .unwrap();
    assert_code(
        send(&app, &ann, keyed(bob.user_id, "one")).await,
        Code::NotFound,
    );
    assert_eq!(
        app.count(
            "SELECT COUNT(*) FROM messages WHERE sender_id = $1",
            ann.user_id
        )
        .await,
        0
    );
    app.stop().await;
}

async fn list_then_stream_from_last_event_id_loses_nothing_under_concurrent_sends(
    backend: Backend,
) {
    let app = spawn_app(backend).await;
    let ann = app.register_and_login("ann").await;
    let bob = app.register_and_login("bob").await;
    let carl = app.register_and_login("carl").await;
    let senders = [
        spawn_sender(&app, &ann, bob.user_id, "from ann", 80),
        spawn_sender(&app, &carl, bob.user_id, "from carl", 80),
    ];
    tokio::time::sleep(Duration::from_millis(40)).await;
    // ListMessages, then ListConversations, each a snapshot with its position.
    let listed = list(
        &app,
        &bob,
        proto::ListMessagesRequest {
            page_size: 1000,
            ..Default::default()
        },
    )
    .await
    .unwrap();
    let conversations = app
        .messages
        .clone()
        .list_conversations(with_bearer(
            proto::ListConversationsRequest::default(),
            &bob.access_token,
        ))
        .await
        .unwrap()
        .into_inner();
    assert!(conversations.last_event_id >= listed.last_event_id);
    let mut seen: HashSet<i64> = listed.messages.iter().map(|m| m.id).collect();
    let mut stream = stream_after(&app, &bob, Some(listed.last_event_id))
        .await
        .unwrap();
    let mut sent = HashSet::new();
    for sender in senders {
        sent.extend(sender.await.unwrap());
    }
    let mut expected_id = listed.last_event_id + 1;
    while !sent.is_subset(&seen) {
        let (event_id, event) = next(&mut stream, SOON)
            .await
            .unwrap_or_else(|| panic!("missing: {:?}", sent.difference(&seen)));
        assert_eq!(event_id, expected_id);
        expected_id += 1;
        seen.insert(message_of(&event).id);
    }
    assert_eq!(seen, sent);
    app.stop().await;
}

async fn only_the_sender_edits_and_the_replay_shows_every_version(backend: Backend) {
    let app = spawn_app(backend).await;
    let ann = app.register_and_login("ann").await;
    let bob = app.register_and_login("bob").await;
    let carl = app.register_and_login("carl").await;
    let sent = send(&app, &ann, text(bob.user_id, "first draft"))
        .await
        .unwrap();
    assert!(sent.edited_at.is_none());
    let mut live = stream_after(&app, &bob, None).await.unwrap();
    let edit = |who: &LoggedIn, message_id: i64, content: &str| {
        let mut messages = app.messages.clone();
        let request = with_bearer(
            proto::EditMessageRequest {
                message_id,
                content: content.into(),
            },
            &who.access_token,
        );
        async move {
            messages
                .edit_message(request)
                .await
                .map(|r| r.into_inner().message.unwrap())
        }
    };
    assert_reason(
        edit(&bob, sent.id, "hijack").await,
        Code::PermissionDenied,
        "NOT_MESSAGE_SENDER",
    );
    let missing = assert_code(edit(&carl, 987_654, "x").await, Code::NotFound);
    let hidden = assert_code(edit(&carl, sent.id, "x").await, Code::NotFound);
    assert_eq!(
        hidden.message().replace(&sent.id.to_string(), "?"),
        missing.message().replace("987654", "?")
    );
    for bad in ["", "  ", &"x".repeat(16_385)] {
        let status = assert_code(edit(&ann, sent.id, bad).await, Code::InvalidArgument);
        assert_eq!(bad_request_fields(&status), ["content"]);
    }
    let edited = edit(&ann, sent.id, "final text").await.unwrap();
    assert_eq!(edited.content, "final text");
    assert!(edited.edited_at.is_some());
    let (_, event) = next(&mut live, SOON).await.unwrap();
    assert_eq!(event, Event::Edited(edited.clone()));
    app.messages
        .clone()
        .delete_message(with_bearer(
            proto::DeleteMessageRequest {
                message_id: sent.id,
            },
            &ann.access_token,
        ))
        .await
        .unwrap();
    // The replay shows each event's own version, the deletion included.
    let mut replay = stream_after(&app, &bob, Some(0)).await.unwrap();
    let mut versions = Vec::new();
    for _ in 0..3 {
        let (_, event) = next(&mut replay, SOON).await.unwrap();
        versions.push(event);
    }
    assert_eq!(
        versions,
        [
            Event::Created(sent),
            Event::Edited(edited.clone()),
            Event::Deleted(edited)
        ]
    );
    app.stop().await;
}

async fn threads_list_direct_replies_and_reply_counts_follow_deletes(backend: Backend) {
    let app = spawn_app(backend).await;
    let ann = app.register_and_login("ann").await;
    let bob = app.register_and_login("bob").await;
    let carl = app.register_and_login("carl").await;
    let reply = |to: i64, parent: i64, content: &str| proto::SendMessageRequest {
        parent_id: Some(parent),
        ..text(to, content)
    };
    let root = send(&app, &ann, text(bob.user_id, "root")).await.unwrap();
    let first = send(&app, &bob, reply(ann.user_id, root.id, "first"))
        .await
        .unwrap();
    let second = send(&app, &ann, reply(bob.user_id, root.id, "second"))
        .await
        .unwrap();
    let nested = send(&app, &ann, reply(bob.user_id, first.id, "nested"))
        .await
        .unwrap();
    send(&app, &ann, text(bob.user_id, "unrelated"))
        .await
        .unwrap();
    let page = replies(&app, &bob, root.id, 1, String::new())
        .await
        .unwrap();
    assert_eq!(
        page.messages.iter().map(|m| m.id).collect::<Vec<_>>(),
        [second.id]
    );
    let rest = replies(&app, &bob, root.id, 1, page.next_page_token)
        .await
        .unwrap();
    assert_eq!(
        rest.messages.iter().map(|m| m.id).collect::<Vec<_>>(),
        [first.id]
    );
    assert!(rest.next_page_token.is_empty());
    let nested_page = replies(&app, &ann, first.id, 0, String::new())
        .await
        .unwrap();
    assert_eq!(nested_page.messages[0].id, nested.id);
    assert_eq!(nested_page.messages.len(), 1);
    // The parent must be one the caller can see.
    assert_code(
        replies(&app, &carl, root.id, 0, String::new()).await,
        Code::NotFound,
    );
    assert_code(
        replies(&app, &carl, 987_654, 0, String::new()).await,
        Code::NotFound,
    );

    let count_of = |id: i64| {
        let mut messages = app.messages.clone();
        let token = ann.access_token.clone();
        async move {
            messages
                .get_message(with_bearer(
                    proto::GetMessageRequest { message_id: id },
                    &token,
                ))
                .await
                .unwrap()
                .into_inner()
                .message
                .unwrap()
                .reply_count
        }
    };
    assert_eq!(count_of(root.id).await, 2);
    assert_eq!(count_of(first.id).await, 1);
    assert_eq!(count_of(nested.id).await, 0);
    app.messages
        .clone()
        .delete_message(with_bearer(
            proto::DeleteMessageRequest {
                message_id: second.id,
            },
            &ann.access_token,
        ))
        .await
        .unwrap();
    assert_eq!(count_of(root.id).await, 1);
    // A deleted parent leaves its replies, which stay in the listing.
    app.messages
        .clone()
        .delete_message(with_bearer(
            proto::DeleteMessageRequest {
                message_id: root.id,
            },
            &ann.access_token,
        ))
        .await
        .unwrap();
    let orphan = list(&app, &bob, proto::ListMessagesRequest::default())
        .await
        .unwrap()
        .messages
        .into_iter()
        .find(|m| m.id == first.id)
        .unwrap();
    assert_eq!((orphan.parent_id, orphan.reply_count), (None, 1));
    app.stop().await;
}

async fn reply_and_unread_counts_stay_exact_under_concurrent_writes(backend: Backend) {
    let app = spawn_app(backend).await;
    let ann = app.register_and_login("ann").await;
    let bob = app.register_and_login("bob").await;
    let root = send(&app, &ann, text(bob.user_id, "root")).await.unwrap();
    let conversation_id = root.conversation_id.clone();
    let mut tasks = Vec::new();
    // Ann sends replies (deleting every third), Bob replies back, marks
    // what he sees read and marks the whole conversation read, all at once.
    for worker in 0..3 {
        let (mut messages, token, to) =
            (app.messages.clone(), ann.access_token.clone(), bob.user_id);
        tasks.push(tokio::spawn(async move {
            for i in 0..15 {
                let sent = messages
                    .send_message(with_bearer(
                        proto::SendMessageRequest {
                            parent_id: Some(root.id),
                            ..text(to, &format!("ann {worker} {i}"))
                        },
                        &token,
                    ))
                    .await
                    .unwrap()
                    .into_inner()
                    .message
                    .unwrap();
                if i % 3 == 0 {
                    messages
                        .delete_message(with_bearer(
                            proto::DeleteMessageRequest {
                                message_id: sent.id,
                            },
                            &token,
                        ))
                        .await
                        .unwrap();
                }
            }
        }));
    }
    {
        let (mut messages, token, to) =
            (app.messages.clone(), bob.access_token.clone(), ann.user_id);
        tasks.push(tokio::spawn(async move {
            for i in 0..15 {
                messages
                    .send_message(with_bearer(
                        proto::SendMessageRequest {
                            parent_id: Some(root.id),
                            ..text(to, &format!("bob {i}"))
                        },
                        &token,
                    ))
                    .await
                    .unwrap();
            }
        }));
    }
    for _ in 0..2 {
        let (mut messages, token) = (app.messages.clone(), bob.access_token.clone());
        let conversation_id = conversation_id.clone();
        let ann_id = ann.user_id;
        tasks.push(tokio::spawn(async move {
            for round in 0..10 {
                let unread = messages
                    .list_messages(with_bearer(
                        proto::ListMessagesRequest {
                            unread_only: true,
                            page_size: 5,
                            ..Default::default()
                        },
                        &token,
                    ))
                    .await
                    .unwrap()
                    .into_inner()
                    .messages;
                messages
                    .mark_read(with_bearer(
                        proto::MarkReadRequest {
                            message_ids: unread.iter().map(|m| m.id).collect(),
                        },
                        &token,
                    ))
                    .await
                    .unwrap();
                if round % 4 == 3 {
                    messages
                        .mark_conversation_read(with_bearer(
                            proto::MarkConversationReadRequest {
                                conversation_id: conversation_id.clone(),
                                other_user_id: ann_id,
                            },
                            &token,
                        ))
                        .await
                        .unwrap();
                }
            }
        }));
    }
    for task in tasks {
        task.await.unwrap();
    }
    // Every count the server keeps equals a count of the rows themselves.
    let replies = app
        .count(
            "SELECT COUNT(*) FROM messages WHERE parent_id = $1",
            root.id,
        )
        .await;
    assert_eq!(replies, 3 * 10 + 15);
    let root_now = list_all(&app, &ann)
        .await
        .into_iter()
        .find(|m| m.id == root.id)
        .unwrap();
    assert_eq!(i64::from(root_now.reply_count), replies);
    let unread = app
        .count(
            "SELECT COUNT(*) FROM messages WHERE recipient_id = $1 AND is_read = FALSE",
            bob.user_id,
        )
        .await;
    assert_eq!(unread_total(&app, &bob).await, unread);
    let conversations = app
        .messages
        .clone()
        .list_conversations(with_bearer(
            proto::ListConversationsRequest::default(),
            &bob.access_token,
        ))
        .await
        .unwrap()
        .into_inner()
        .conversations;
    assert_eq!(conversations.len(), 1);
    assert_eq!(conversations[0].unread_count, unread);
    // And the whole conversation read leaves nothing unread.
    let marked = app
        .messages
        .clone()
        .mark_conversation_read(with_bearer(
            proto::MarkConversationReadRequest {
                conversation_id,
                other_user_id: ann.user_id,
            },
            &bob.access_token,
        ))
        .await
        .unwrap()
        .into_inner()
        .updated_count;
    assert_eq!(i64::from(marked), unread);
    assert_eq!(unread_total(&app, &bob).await, 0);
    app.stop().await;
}

async fn replies(
    app: &TestApp,
    who: &LoggedIn,
    parent_id: i64,
    page_size: i32,
    page_token: String,
) -> Result<proto::ListMessagesResponse, Status> {
    list(
        app,
        who,
        proto::ListMessagesRequest {
            parent_id: Some(parent_id),
            page_size,
            page_token,
            ..Default::default()
        },
    )
    .await
}

async fn search(
    app: &TestApp,
    who: &LoggedIn,
    query: &str,
    page_size: i32,
    page_token: String,
) -> Result<proto::SearchMessagesResponse, Status> {
    app.messages
        .clone()
        .search_messages(with_bearer(
            proto::SearchMessagesRequest {
                query: query.into(),
                page_size,
                page_token,
            },
            &who.access_token,
        ))
        .await
        .map(tonic::Response::into_inner)
}

/// The ids on the first page (up to 100) of `who`'s search for `query`.
async fn search_ids(app: &TestApp, who: &LoggedIn, query: &str) -> Vec<i64> {
    search(app, who, query, 100, String::new())
        .await
        .unwrap()
        .messages
        .iter()
        .map(|m| m.id)
        .collect()
}

async fn search_finds_substrings_ignoring_ascii_case_pages_and_never_shows_others(
    backend: Backend,
) {
    let app = spawn_app(backend).await;
    let ann = app.register_and_login("ann").await;
    let bob = app.register_and_login("bob").await;
    let carl = app.register_and_login("carl").await;
    let dan = app.register_and_login("dan").await;
    let mut hits = Vec::new();
    for content in ["Say HELLO there", "hello", "xHeLlOx", "50%_off hello"] {
        hits.push(
            send(&app, &ann, text(bob.user_id, content))
                .await
                .unwrap()
                .id,
        );
    }
    hits.push(
        send(&app, &bob, text(ann.user_id, "bob says hello"))
            .await
            .unwrap()
            .id,
    );
    for content in ["héllo, not hello's kin: HÉLLO", "help", "hell o"] {
        send(&app, &ann, text(bob.user_id, content)).await.unwrap();
    }
    let strangers = send(&app, &carl, text(dan.user_id, "hello from carl"))
        .await
        .unwrap();
    hits.reverse();
    // Newest first, two to a page.
    let mut found = Vec::new();
    let mut token = String::new();
    loop {
        let page = search(&app, &ann, "hElLo", 2, token).await.unwrap();
        assert!(page.messages.len() <= 2);
        found.extend(page.messages.iter().map(|m| m.id));
        if page.next_page_token.is_empty() {
            break;
        }
        token = page.next_page_token;
    }
    // "héllo..." also contains "hello" ("not hello's kin").
    let all = search_ids(&app, &ann, "hello").await;
    assert_eq!(found, all);
    assert_eq!(all.len(), hits.len() + 1);
    assert!(hits.iter().all(|id| all.contains(id)));
    assert!(!all.contains(&strangers.id), "another pair's message");
    // The same once the text index has taken every message (SQLite indexes
    // new messages in the background; before that they are searched apart).
    app.state.db.index_text().await.unwrap();
    let indexed = search_ids(&app, &ann, "HELLO").await;
    assert_eq!(indexed, all);
    // Edits and deletes show at once, of indexed messages and of new ones.
    let edit = |message_id: i64, content: &str| {
        let mut messages = app.messages.clone();
        let request = with_bearer(
            proto::EditMessageRequest {
                message_id,
                content: content.into(),
            },
            &ann.access_token,
        );
        async move { messages.edit_message(request).await.unwrap() }
    };
    let fresh = send(&app, &ann, text(bob.user_id, "fresh hello"))
        .await
        .unwrap();
    edit(fresh.id, "fresh goodbye").await;
    edit(hits[hits.len() - 1], "Say goodbye there").await;
    app.messages
        .clone()
        .delete_message(with_bearer(
            proto::DeleteMessageRequest {
                message_id: hits[hits.len() - 2],
            },
            &ann.access_token,
        ))
        .await
        .unwrap();
    for round in 0..2 {
        let now = search_ids(&app, &ann, "hello").await;
        assert_eq!(now.len(), all.len() - 2, "round {round}");
        let goodbyes = search(&app, &ann, "GOODBYE", 0, String::new())
            .await
            .unwrap();
        assert_eq!(goodbyes.messages.len(), 2, "round {round}");
        app.state.db.index_text().await.unwrap();
    }
    // ASCII letters only: É is not é.
    let accented = search(&app, &ann, "HÉLLO", 0, String::new()).await.unwrap();
    assert_eq!(accented.messages.len(), 1);
    assert!(accented.messages[0].content.contains("HÉLLO"));
    let lower_accented = search(&app, &ann, "héllo", 0, String::new()).await.unwrap();
    assert_eq!(lower_accented.messages.len(), 1);
    // Wildcards are plain characters.
    let literal = search(&app, &ann, "%_o", 0, String::new()).await.unwrap();
    assert_eq!(literal.messages.len(), 1);
    assert!(
        search(&app, &ann, "l_o", 0, String::new())
            .await
            .unwrap()
            .messages
            .is_empty()
    );
    assert!(
        search(&app, &dan, "hello", 0, String::new())
            .await
            .unwrap()
            .messages
            .iter()
            .all(|m| m.id == strangers.id)
    );
    for bad in ["he", "", &"x".repeat(201)] {
        let status = assert_code(
            search(&app, &ann, bad, 0, String::new()).await,
            Code::InvalidArgument,
        );
        assert_eq!(bad_request_fields(&status), ["query"], "{bad:?}");
    }
    // A page token belongs to its query.
    let first = search(&app, &ann, "hello", 1, String::new()).await.unwrap();
    let status = assert_code(
        search(&app, &ann, "hell", 1, first.next_page_token).await,
        Code::InvalidArgument,
    );
    assert_eq!(bad_request_fields(&status), ["page_token"]);
    app.stop().await;
}

async fn search_uses_the_text_index(backend: Backend) {
    let app = spawn_app(backend).await;
    let ann = app.register_and_login("ann").await;
    let bob = app.register_and_login("bob").await;
    // Enough rows that a planner weighing a table scan prefers the index
    // (PostgreSQL rightly scans a table of a few dozen pages instead).
    let fill = match backend {
        Backend::Sqlite => {
            "INSERT INTO messages (sender_id, recipient_id, content, is_read, conversation_id, \
             created_at, user_low, user_high) \
             WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < 5000) \
             SELECT $1, $1, 'filler text number ' || i, FALSE, 'c', i, $1, $1 FROM n"
        }
        Backend::Postgres => {
            "INSERT INTO messages (sender_id, recipient_id, content, is_read, conversation_id, \
             created_at, user_low, user_high) \
             SELECT $1, $1, 'filler text number ' || i, FALSE, 'c', i, $1, $1 \
             FROM generate_series(1, 40000) AS i"
        }
    };
    app.execute(fill, ann.user_id).await;
    if backend == Backend::Postgres {
        app.execute_unbound("ANALYZE messages").await;
    }
    send(&app, &bob, text(ann.user_id, "the needle"))
        .await
        .unwrap();
    app.state.db.index_text().await.unwrap();
    let plan = app
        .state
        .db
        .explain_search(ann.user_id, "NEEDLE")
        .await
        .unwrap();
    match backend {
        Backend::Sqlite => {
            assert!(
                plan.contains("VIRTUAL TABLE INDEX") && plan.contains("messages_fts"),
                "{plan}"
            );
            // Not the user's messages scanned with the text as a filter.
            assert!(!plan.contains("messages_sender_created_idx"), "{plan}");
        }
        Backend::Postgres => {
            assert!(plan.contains("messages_content_trgm_idx"), "{plan}");
            assert!(!plan.contains("Seq Scan"), "{plan}");
        }
    }
    let found = search(&app, &ann, "NEEDLE", 0, String::new())
        .await
        .unwrap();
    assert_eq!(found.messages.len(), 1);
    app.stop().await;
}

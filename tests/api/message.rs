//! MessageService: privacy, conversations, pagination, read state, deletion
//! and the live stream, on one instance and across two.

use std::{collections::HashSet, time::Duration};

use ai_message::proto::{self, stream_messages_response::Event};
use tonic::{Code, Status, Streaming};

use crate::helpers::{
    Backend, LoggedIn, TestApp, assert_code, bad_request_fields, spawn_app, with_bearer,
};

backend_tests!(
    sender_and_recipient_see_a_message_and_a_stranger_gets_not_found_everywhere,
    send_validates_content_and_conversation_id,
    unknown_recipients_are_not_found_and_disabled_ones_a_failed_precondition,
    a_pair_shares_a_default_conversation_and_two_pairs_with_one_id_stay_apart,
    replies_join_the_parents_conversation,
    list_messages_pages_stay_exact_while_new_messages_arrive,
    list_messages_filters_by_partner_conversation_and_unread,
    mark_read_counts_only_the_callers_unread_received_messages,
    list_conversations_orders_by_activity_and_counts_unread,
    only_the_sender_deletes_and_the_conversation_follows,
    three_hundred_concurrent_sends_from_ten_clients_are_all_stored,
    a_stream_receives_created_read_and_deleted_events,
    every_device_of_the_sender_receives_its_own_message,
    a_message_too_large_for_a_notification_still_streams,
    logout_ends_the_stream_with_unauthenticated,
    server_shutdown_ends_streams_cleanly,
    two_instances_share_stream_events_and_revocations,
    a_subscriber_that_stops_reading_is_told_it_lagged_and_holds_nobody_back,
    a_failing_message_in_a_group_commit_fails_alone,
    a_batch_of_sends_logs_dense_event_ids_and_merges_conversation_rows,
    first_pages_show_every_change_at_once_under_every_filter,
);

pub(crate) async fn send(
    app: &TestApp,
    from: &LoggedIn,
    request: proto::SendMessageRequest,
) -> Result<proto::Message, Status> {
    app.messages
        .clone()
        .send_message(with_bearer(request, &from.access_token))
        .await
        .map(|r| r.into_inner().message.unwrap())
}

pub(crate) fn text(to: i64, content: &str) -> proto::SendMessageRequest {
    proto::SendMessageRequest {
        recipient_id: to,
        content: content.into(),
        parent_id: None,
        conversation_id: None,
        request_id: None,
    }
}

fn in_conversation(to: i64, content: &str, conversation: &str) -> proto::SendMessageRequest {
    proto::SendMessageRequest {
        conversation_id: Some(conversation.into()),
        ..text(to, content)
    }
}

pub(crate) async fn list(
    app: &TestApp,
    who: &LoggedIn,
    request: proto::ListMessagesRequest,
) -> Result<proto::ListMessagesResponse, Status> {
    app.messages
        .clone()
        .list_messages(with_bearer(request, &who.access_token))
        .await
        .map(tonic::Response::into_inner)
}

/// Every message of `who` (up to 1,000, newest first).
pub(crate) async fn list_all(app: &TestApp, who: &LoggedIn) -> Vec<proto::Message> {
    list(
        app,
        who,
        proto::ListMessagesRequest {
            page_size: 1000,
            ..Default::default()
        },
    )
    .await
    .unwrap()
    .messages
}

async fn conversations(
    app: &TestApp,
    who: &LoggedIn,
    page_size: i32,
    page_token: String,
) -> proto::ListConversationsResponse {
    app.messages
        .clone()
        .list_conversations(with_bearer(
            proto::ListConversationsRequest {
                page_size,
                page_token,
            },
            &who.access_token,
        ))
        .await
        .unwrap()
        .into_inner()
}

async fn get_message(
    app: &TestApp,
    who: &LoggedIn,
    message_id: i64,
) -> Result<proto::Message, Status> {
    app.messages
        .clone()
        .get_message(with_bearer(
            proto::GetMessageRequest { message_id },
            &who.access_token,
        ))
        .await
        .map(|r| r.into_inner().message.unwrap())
}

async fn mark_read(app: &TestApp, who: &LoggedIn, ids: Vec<i64>) -> Result<i32, Status> {
    app.messages
        .clone()
        .mark_read(with_bearer(
            proto::MarkReadRequest { message_ids: ids },
            &who.access_token,
        ))
        .await
        .map(|r| r.into_inner().updated_count)
}

async fn delete(app: &TestApp, who: &LoggedIn, message_id: i64) -> Result<(), Status> {
    app.messages
        .clone()
        .delete_message(with_bearer(
            proto::DeleteMessageRequest { message_id },
            &who.access_token,
        ))
        .await
        .map(|_| ())
}

async fn subscribe(app: &TestApp, who: &LoggedIn) -> Streaming<proto::StreamMessagesResponse> {
    app.open_stream(who).await.unwrap()
}

/// The next event within `within`, or `None` if none came.
async fn next_event(
    stream: &mut Streaming<proto::StreamMessagesResponse>,
    within: Duration,
) -> Option<Result<Event, Status>> {
    match tokio::time::timeout(within, stream.message()).await {
        Err(_) => None,
        Ok(Ok(Some(response))) => Some(Ok(response.event.unwrap())),
        Ok(Ok(None)) => panic!("stream ended without a status"),
        Ok(Err(status)) => Some(Err(status)),
    }
}

const SOON: Duration = Duration::from_secs(2);

async fn sender_and_recipient_see_a_message_and_a_stranger_gets_not_found_everywhere(
    backend: Backend,
) {
    let app = spawn_app(backend).await;
    let ann = app.register_and_login("ann").await;
    let bob = app.register_and_login("bob").await;
    let eve = app.register_and_login("eve").await;
    let sent = send(&app, &ann, text(bob.user_id, "hello bob"))
        .await
        .unwrap();
    assert_eq!(
        (sent.sender_id, sent.recipient_id),
        (ann.user_id, bob.user_id)
    );
    assert!(!sent.is_read && sent.read_at.is_none() && sent.created_at.is_some());
    for reader in [&ann, &bob] {
        let got = get_message(&app, reader, sent.id).await.unwrap();
        assert_eq!(got, sent);
    }
    let hidden = assert_code(get_message(&app, &eve, sent.id).await, Code::NotFound);
    let missing = assert_code(get_message(&app, &eve, 987_654).await, Code::NotFound);
    assert_eq!(hidden.message(), missing.message());
    assert_eq!(
        assert_code(delete(&app, &eve, sent.id).await, Code::NotFound).message(),
        missing.message()
    );
    assert_eq!(mark_read(&app, &eve, vec![sent.id]).await.unwrap(), 0);
    assert_code(
        send(
            &app,
            &eve,
            proto::SendMessageRequest {
                parent_id: Some(sent.id),
                ..text(ann.user_id, "re")
            },
        )
        .await,
        Code::NotFound,
    );
    assert!(
        list(&app, &eve, proto::ListMessagesRequest::default())
            .await
            .unwrap()
            .messages
            .is_empty()
    );
    assert!(
        conversations(&app, &eve, 0, String::new())
            .await
            .conversations
            .is_empty()
    );
    let still = get_message(&app, &bob, sent.id).await.unwrap();
    assert!(!still.is_read, "the stranger's MarkRead changed nothing");
    app.stop().await;
}

async fn send_validates_content_and_conversation_id(backend: Backend) {
    let app = spawn_app(backend).await;
    let ann = app.register_and_login("ann").await;
    let bob = app.register("bob").await;
    for (content, conversation) in [
        ("", None),
        ("   \n ", None),
        ("nul\0", None),
        (&*"x".repeat(16_385), None),
        ("ok", Some("has space")),
        ("ok", Some("")),
        ("ok", Some(&*"c".repeat(101))),
    ] {
        let status = assert_code(
            send(
                &app,
                &ann,
                proto::SendMessageRequest {
                    conversation_id: conversation.map(str::to_owned),
                    ..text(bob.id, content)
                },
            )
            .await,
            Code::InvalidArgument,
        );
        let expected = if conversation.is_some() {
            "conversation_id"
        } else {
            "content"
        };
        assert_eq!(
            bad_request_fields(&status),
            [expected],
            "{content:?} {conversation:?}"
        );
    }
    let longest = send(
        &app,
        &ann,
        in_conversation(bob.id, &"é".repeat(16_384), "x.y:z-1_2"),
    )
    .await
    .unwrap();
    assert_eq!(longest.content.chars().count(), 16_384);
    let status = assert_code(
        list(
            &app,
            &ann,
            proto::ListMessagesRequest {
                conversation_id: Some("bad id".into()),
                ..Default::default()
            },
        )
        .await,
        Code::InvalidArgument,
    );
    assert_eq!(bad_request_fields(&status), ["conversation_id"]);
    app.stop().await;
}

async fn unknown_recipients_are_not_found_and_disabled_ones_a_failed_precondition(
    backend: Backend,
) {
    let app = spawn_app(backend).await;
    let ann = app.register_and_login("ann").await;
    let gone = app.register("gone").await;
    assert_code(send(&app, &ann, text(987_654, "hi")).await, Code::NotFound);
    assert_code(send(&app, &ann, text(0, "hi")).await, Code::NotFound);
    app.state
        .db
        .set_user_active(gone.id, false, app.state.clock.now().micros())
        .await
        .unwrap();
    assert_code(
        send(&app, &ann, text(gone.id, "hi")).await,
        Code::FailedPrecondition,
    );
    app.stop().await;
}

async fn a_pair_shares_a_default_conversation_and_two_pairs_with_one_id_stay_apart(
    backend: Backend,
) {
    let app = spawn_app(backend).await;
    let ann = app.register_and_login("ann").await;
    let bob = app.register_and_login("bob").await;
    let cat = app.register_and_login("cat").await;
    let dan = app.register_and_login("dan").await;
    let first = send(&app, &ann, text(bob.user_id, "one")).await.unwrap();
    let back = send(&app, &bob, text(ann.user_id, "two")).await.unwrap();
    assert_eq!(
        first.conversation_id, back.conversation_id,
        "one default conversation per pair"
    );
    let other_pair = send(&app, &cat, text(dan.user_id, "three")).await.unwrap();
    assert_ne!(first.conversation_id, other_pair.conversation_id);

    send(
        &app,
        &ann,
        in_conversation(bob.user_id, "ann to bob", "project"),
    )
    .await
    .unwrap();
    send(
        &app,
        &cat,
        in_conversation(dan.user_id, "cat to dan", "project"),
    )
    .await
    .unwrap();
    for (who, expected) in [
        (&ann, "ann to bob"),
        (&bob, "ann to bob"),
        (&cat, "cat to dan"),
        (&dan, "cat to dan"),
    ] {
        let page = list(
            &app,
            who,
            proto::ListMessagesRequest {
                conversation_id: Some("project".into()),
                ..Default::default()
            },
        )
        .await
        .unwrap();
        let contents: Vec<_> = page.messages.iter().map(|m| m.content.as_str()).collect();
        assert_eq!(contents, [expected]);
        let convs = conversations(&app, who, 0, String::new())
            .await
            .conversations;
        let project: Vec<_> = convs
            .iter()
            .filter(|c| c.conversation_id == "project")
            .collect();
        assert_eq!(project.len(), 1);
        assert_eq!(project[0].last_message.as_ref().unwrap().content, expected);
    }
    app.stop().await;
}

async fn replies_join_the_parents_conversation(backend: Backend) {
    let app = spawn_app(backend).await;
    let ann = app.register_and_login("ann").await;
    let bob = app.register_and_login("bob").await;
    let cat = app.register_and_login("cat").await;
    let root = send(&app, &ann, in_conversation(bob.user_id, "topic", "plans"))
        .await
        .unwrap();
    let reply = send(
        &app,
        &bob,
        proto::SendMessageRequest {
            parent_id: Some(root.id),
            ..text(ann.user_id, "re: topic")
        },
    )
    .await
    .unwrap();
    assert_eq!(reply.parent_id, Some(root.id));
    assert_eq!(reply.conversation_id, "plans");
    let same = send(
        &app,
        &bob,
        proto::SendMessageRequest {
            parent_id: Some(root.id),
            conversation_id: Some("plans".into()),
            ..text(ann.user_id, "ok")
        },
    )
    .await;
    assert!(same.is_ok(), "naming the parent's own conversation is fine");
    let status = assert_code(
        send(
            &app,
            &bob,
            proto::SendMessageRequest {
                parent_id: Some(root.id),
                conversation_id: Some("other".into()),
                ..text(ann.user_id, "x")
            },
        )
        .await,
        Code::InvalidArgument,
    );
    assert_eq!(bad_request_fields(&status), ["conversation_id"]);
    let status = assert_code(
        send(
            &app,
            &bob,
            proto::SendMessageRequest {
                parent_id: Some(root.id),
                ..text(cat.user_id, "forward")
            },
        )
        .await,
        Code::InvalidArgument,
    );
    assert_eq!(bad_request_fields(&status), ["parent_id"]);
    assert_code(
        send(
            &app,
            &cat,
            proto::SendMessageRequest {
                parent_id: Some(root.id),
                ..text(ann.user_id, "x")
            },
        )
        .await,
        Code::NotFound,
    );
    app.stop().await;
}

async fn list_messages_pages_stay_exact_while_new_messages_arrive(backend: Backend) {
    let app = spawn_app(backend).await;
    let ann = app.register_and_login("ann").await;
    let bob = app.register_and_login("bob").await;
    let mut expected = Vec::new();
    for i in 0..55 {
        let (from, to) = if i % 2 == 0 {
            (&ann, &bob)
        } else {
            (&bob, &ann)
        };
        expected.push(
            send(&app, from, text(to.user_id, &format!("m{i}")))
                .await
                .unwrap()
                .id,
        );
    }
    expected.reverse();
    let mut seen = Vec::new();
    let mut token = String::new();
    let mut pages = 0;
    loop {
        let page = list(
            &app,
            &ann,
            proto::ListMessagesRequest {
                page_size: 10,
                page_token: token.clone(),
                ..Default::default()
            },
        )
        .await
        .unwrap();
        pages += 1;
        seen.extend(page.messages.iter().map(|m| m.id));
        if page.next_page_token.is_empty() {
            assert_eq!(page.messages.len(), 5);
            break;
        }
        assert_eq!(page.messages.len(), 10);
        // New messages arrive between pages; they are newer than every page.
        send(&app, &bob, text(ann.user_id, "interruption"))
            .await
            .unwrap();
        token = page.next_page_token;
    }
    assert_eq!(pages, 6);
    assert_eq!(seen, expected, "newest first, no duplicates, no gaps");
    let status = assert_code(
        list(
            &app,
            &bob,
            proto::ListMessagesRequest {
                page_size: 10,
                page_token: token,
                ..Default::default()
            },
        )
        .await,
        Code::InvalidArgument,
    );
    assert_eq!(
        bad_request_fields(&status),
        ["page_token"],
        "another caller's token"
    );
    app.stop().await;
}

async fn list_messages_filters_by_partner_conversation_and_unread(backend: Backend) {
    let app = spawn_app(backend).await;
    let ann = app.register_and_login("ann").await;
    let bob = app.register_and_login("bob").await;
    let cat = app.register_and_login("cat").await;
    let from_bob = send(&app, &bob, text(ann.user_id, "from bob"))
        .await
        .unwrap();
    let to_bob = send(&app, &ann, text(bob.user_id, "to bob")).await.unwrap();
    let from_cat = send(&app, &cat, in_conversation(ann.user_id, "from cat", "club"))
        .await
        .unwrap();
    let note = send(&app, &ann, text(ann.user_id, "note to self"))
        .await
        .unwrap();
    let ids =
        |page: proto::ListMessagesResponse| page.messages.iter().map(|m| m.id).collect::<Vec<_>>();

    let all = ids(list(&app, &ann, proto::ListMessagesRequest::default())
        .await
        .unwrap());
    assert_eq!(all, [note.id, from_cat.id, to_bob.id, from_bob.id]);
    let with_bob = ids(list(
        &app,
        &ann,
        proto::ListMessagesRequest {
            with_user_id: Some(bob.user_id),
            ..Default::default()
        },
    )
    .await
    .unwrap());
    assert_eq!(with_bob, [to_bob.id, from_bob.id]);
    let unread = ids(list(
        &app,
        &ann,
        proto::ListMessagesRequest {
            unread_only: true,
            ..Default::default()
        },
    )
    .await
    .unwrap());
    assert_eq!(
        unread,
        [note.id, from_cat.id, from_bob.id],
        "only received, unread"
    );
    let club = ids(list(
        &app,
        &ann,
        proto::ListMessagesRequest {
            conversation_id: Some("club".into()),
            ..Default::default()
        },
    )
    .await
    .unwrap());
    assert_eq!(club, [from_cat.id]);
    let bob_unread = ids(list(
        &app,
        &ann,
        proto::ListMessagesRequest {
            with_user_id: Some(bob.user_id),
            unread_only: true,
            ..Default::default()
        },
    )
    .await
    .unwrap());
    assert_eq!(bob_unread, [from_bob.id]);
    let self_notes = ids(list(
        &app,
        &ann,
        proto::ListMessagesRequest {
            with_user_id: Some(ann.user_id),
            ..Default::default()
        },
    )
    .await
    .unwrap());
    assert_eq!(self_notes, [note.id]);
    app.stop().await;
}

async fn mark_read_counts_only_the_callers_unread_received_messages(backend: Backend) {
    let app = spawn_app(backend).await;
    let ann = app.register_and_login("ann").await;
    let bob = app.register_and_login("bob").await;
    let received = send(&app, &bob, text(ann.user_id, "for ann"))
        .await
        .unwrap();
    let also = send(&app, &bob, text(ann.user_id, "for ann too"))
        .await
        .unwrap();
    let sent = send(&app, &ann, text(bob.user_id, "for bob"))
        .await
        .unwrap();
    assert_eq!(
        mark_read(&app, &ann, vec![received.id, received.id, sent.id, 987_654])
            .await
            .unwrap(),
        1
    );
    assert_eq!(
        mark_read(&app, &ann, vec![received.id, also.id])
            .await
            .unwrap(),
        1,
        "already read is not counted"
    );
    let now_read = get_message(&app, &bob, received.id).await.unwrap();
    assert!(now_read.is_read && now_read.read_at.is_some());
    let untouched = get_message(&app, &bob, sent.id).await.unwrap();
    assert!(
        !untouched.is_read,
        "the sender cannot mark the recipient's copy read"
    );
    let status = assert_code(
        mark_read(&app, &ann, vec![received.id; 1001]).await,
        Code::InvalidArgument,
    );
    assert_eq!(bad_request_fields(&status), ["message_ids"]);
    assert_eq!(
        mark_read(&app, &ann, vec![received.id; 1000])
            .await
            .unwrap(),
        0
    );
    app.stop().await;
}

async fn list_conversations_orders_by_activity_and_counts_unread(backend: Backend) {
    let app = spawn_app(backend).await;
    let ann = app.register_and_login("ann").await;
    let bob = app.register_and_login("bob").await;
    let cat = app.register_and_login("cat").await;
    let b1 = send(&app, &bob, text(ann.user_id, "b1")).await.unwrap();
    send(&app, &bob, text(ann.user_id, "b2")).await.unwrap();
    send(&app, &cat, text(ann.user_id, "c1")).await.unwrap();
    let mine = send(
        &app,
        &ann,
        in_conversation(bob.user_id, "side topic", "side"),
    )
    .await
    .unwrap();
    let page = conversations(&app, &ann, 0, String::new()).await;
    let summary: Vec<_> = page
        .conversations
        .iter()
        .map(|c| {
            (
                c.other_user_id,
                c.last_message.as_ref().unwrap().content.clone(),
                c.unread_count,
            )
        })
        .collect();
    assert_eq!(
        summary,
        [
            (bob.user_id, "side topic".to_owned(), 0),
            (cat.user_id, "c1".to_owned(), 1),
            (bob.user_id, "b2".to_owned(), 2)
        ]
    );
    assert_eq!(page.conversations[0].conversation_id, mine.conversation_id);
    mark_read(&app, &ann, vec![b1.id]).await.unwrap();
    let page = conversations(&app, &ann, 0, String::new()).await;
    assert_eq!(page.conversations[2].unread_count, 1);
    // Bob's view: his own messages are not unread for him.
    let bobs = conversations(&app, &bob, 0, String::new()).await;
    assert!(
        bobs.conversations
            .iter()
            .all(|c| c.unread_count == 0 || c.conversation_id == mine.conversation_id)
    );
    // Pages of one.
    let mut token = String::new();
    let mut seen = Vec::new();
    loop {
        let page = conversations(&app, &ann, 1, token).await;
        seen.extend(
            page.conversations
                .iter()
                .map(|c| c.last_message.as_ref().unwrap().id),
        );
        if page.next_page_token.is_empty() {
            break;
        }
        token = page.next_page_token;
    }
    assert_eq!(seen.len(), 3);
    assert_eq!(seen.iter().collect::<HashSet<_>>().len(), 3);
    app.stop().await;
}

async fn only_the_sender_deletes_and_the_conversation_follows(backend: Backend) {
    let app = spawn_app(backend).await;
    let ann = app.register_and_login("ann").await;
    let bob = app.register_and_login("bob").await;
    let first = send(&app, &ann, text(bob.user_id, "first")).await.unwrap();
    let second = send(&app, &ann, text(bob.user_id, "second")).await.unwrap();
    assert_code(delete(&app, &bob, second.id).await, Code::PermissionDenied);
    delete(&app, &ann, second.id).await.unwrap();
    assert_code(delete(&app, &ann, second.id).await, Code::NotFound);
    let convs = conversations(&app, &bob, 0, String::new())
        .await
        .conversations;
    assert_eq!(
        convs[0].last_message.as_ref().unwrap().id,
        first.id,
        "the previous message is the last again"
    );
    assert_eq!(
        convs[0].unread_count, 1,
        "a deleted unread message no longer counts"
    );
    delete(&app, &ann, first.id).await.unwrap();
    assert!(
        conversations(&app, &bob, 0, String::new())
            .await
            .conversations
            .is_empty()
    );
    assert!(
        list(&app, &bob, proto::ListMessagesRequest::default())
            .await
            .unwrap()
            .messages
            .is_empty()
    );
    app.stop().await;
}

async fn three_hundred_concurrent_sends_from_ten_clients_are_all_stored(backend: Backend) {
    let app = spawn_app(backend).await;
    let mut users = Vec::new();
    for i in 0..10 {
        users.push(app.register_and_login(&format!("user{i}")).await);
    }
    let mut calls = Vec::new();
    for (i, user) in users.iter().enumerate() {
        for j in 0..30 {
            let recipient = users[(i + 1 + j % 9) % 10].user_id;
            let mut client = app.messages.clone();
            let token = user.access_token.clone();
            calls.push(tokio::spawn(async move {
                client
                    .send_message(with_bearer(text(recipient, &format!("{i}-{j}")), &token))
                    .await
            }));
        }
    }
    let mut ids = HashSet::new();
    for call in calls {
        ids.insert(
            call.await
                .unwrap()
                .unwrap()
                .into_inner()
                .message
                .unwrap()
                .id,
        );
    }
    assert_eq!(ids.len(), 300);
    let mut stored = 0;
    for user in &users {
        stored += list_all(&app, user)
            .await
            .iter()
            .filter(|m| m.sender_id == user.user_id)
            .count();
    }
    assert_eq!(stored, 300);
    app.stop().await;
}

async fn a_stream_receives_created_read_and_deleted_events(backend: Backend) {
    let app = spawn_app(backend).await;
    let ann = app.register_and_login("ann").await;
    let bob = app.register_and_login("bob").await;
    let cat = app.register_and_login("cat").await;
    let mut bobs = subscribe(&app, &bob).await;
    let mut cats = subscribe(&app, &cat).await;
    let started = std::time::Instant::now();
    let sent = send(&app, &ann, text(bob.user_id, "live")).await.unwrap();
    let Some(Ok(Event::Created(created))) = next_event(&mut bobs, SOON).await else {
        panic!("no created event")
    };
    assert_eq!(created, sent);
    assert!(started.elapsed() < Duration::from_millis(1000));
    mark_read(&app, &bob, vec![sent.id]).await.unwrap();
    let Some(Ok(Event::Read(read))) = next_event(&mut bobs, SOON).await else {
        panic!("no read event")
    };
    assert!(read.is_read && read.read_at.is_some());
    delete(&app, &ann, sent.id).await.unwrap();
    let Some(Ok(Event::Deleted(deleted))) = next_event(&mut bobs, SOON).await else {
        panic!("no deleted event")
    };
    assert_eq!(deleted.id, sent.id);
    assert!(
        next_event(&mut cats, Duration::from_millis(300))
            .await
            .is_none(),
        "a third user receives nothing"
    );
    app.stop().await;
}

async fn every_device_of_the_sender_receives_its_own_message(backend: Backend) {
    let app = spawn_app(backend).await;
    let ann = app.register_and_login("ann").await;
    let bob = app.register("bob").await;
    let phone_login = app.login("ann", crate::helpers::PASSWORD).await.unwrap();
    let phone = LoggedIn {
        access_token: phone_login.access_token,
        refresh_token: phone_login.refresh_token,
        session_id: phone_login.session_id,
        user_id: ann.user_id,
    };
    let mut on_phone = subscribe(&app, &phone).await;
    let sent = send(&app, &ann, text(bob.id, "from the laptop"))
        .await
        .unwrap();
    let Some(Ok(Event::Created(created))) = next_event(&mut on_phone, SOON).await else {
        panic!("no event on the phone")
    };
    assert_eq!(created.id, sent.id);
    app.stop().await;
}

async fn a_message_too_large_for_a_notification_still_streams(backend: Backend) {
    let app = spawn_app(backend).await;
    let ann = app.register_and_login("ann").await;
    let bob = app.register_and_login("bob").await;
    let mut bobs = subscribe(&app, &bob).await;
    let big = "長".repeat(16_000);
    send(&app, &ann, text(bob.user_id, &big)).await.unwrap();
    let Some(Ok(Event::Created(created))) = next_event(&mut bobs, SOON).await else {
        panic!("no event")
    };
    assert_eq!(created.content, big);
    app.stop().await;
}

async fn logout_ends_the_stream_with_unauthenticated(backend: Backend) {
    let app = spawn_app(backend).await;
    let ann = app.register_and_login("ann").await;
    let mut stream = subscribe(&app, &ann).await;
    let started = std::time::Instant::now();
    app.auth
        .clone()
        .logout(with_bearer(proto::LogoutRequest {}, &ann.access_token))
        .await
        .unwrap();
    let Some(Err(status)) = next_event(&mut stream, SOON).await else {
        panic!("the stream did not end")
    };
    assert_eq!(status.code(), Code::Unauthenticated);
    assert!(started.elapsed() < Duration::from_secs(1));
    app.stop().await;
}

async fn server_shutdown_ends_streams_cleanly(backend: Backend) {
    let app = spawn_app(backend).await;
    let ann = app.register_and_login("ann").await;
    let mut stream = subscribe(&app, &ann).await;
    // `stop` fails unless the server finishes within 10 s with the stream open.
    app.stop().await;
    let ended = tokio::time::timeout(SOON, stream.message())
        .await
        .expect("the stream ends");
    match ended {
        Err(status) => assert_eq!(status.code(), Code::Unavailable, "{status:?}"),
        Ok(other) => panic!("expected UNAVAILABLE, got {other:?}"),
    }
}

async fn two_instances_share_stream_events_and_revocations(backend: Backend) {
    if backend == Backend::Sqlite {
        // One process owns an SQLite file: several instances are a PostgreSQL setup.
        return;
    }
    let first = spawn_app(backend).await;
    let second = first.spawn_sibling().await;
    let ann = first.register_and_login("ann").await;
    let bob = first.register_and_login("bob").await;
    let mut on_second = subscribe(&second, &bob).await;
    let started = std::time::Instant::now();
    let sent = send(&first, &ann, text(bob.user_id, "across instances"))
        .await
        .unwrap();
    let Some(Ok(Event::Created(created))) =
        next_event(&mut on_second, Duration::from_secs(1)).await
    else {
        panic!("the event did not cross instances within 1 s")
    };
    assert_eq!(created.id, sent.id);
    assert!(started.elapsed() < Duration::from_secs(1));

    let started = std::time::Instant::now();
    first
        .auth
        .clone()
        .logout(with_bearer(proto::LogoutRequest {}, &bob.access_token))
        .await
        .unwrap();
    // Enforced by the other instance within a second (the NOTIFY's trip).
    while second.get_me(&bob.access_token).await.is_ok() {
        assert!(
            started.elapsed() < Duration::from_secs(1),
            "the other instance still accepts the token"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let Some(Err(status)) = next_event(&mut on_second, Duration::from_secs(1)).await else {
        panic!("the stream on the other instance did not end within 1 s")
    };
    assert_eq!(status.code(), Code::Unauthenticated);
    assert!(started.elapsed() < Duration::from_secs(1));
    second.stop().await;
    first.stop().await;
}

async fn a_subscriber_that_stops_reading_is_told_it_lagged_and_holds_nobody_back(backend: Backend) {
    let app = spawn_app(backend).await;
    let ann = app.register_and_login("ann").await;
    let bob = app.register_and_login("bob").await;
    let mut stalled = subscribe(&app, &bob).await;
    let second_device = app.login("bob", crate::helpers::PASSWORD).await.unwrap();
    let bob_again = LoggedIn {
        access_token: second_device.access_token,
        refresh_token: second_device.refresh_token,
        session_id: second_device.session_id,
        user_id: bob.user_id,
    };
    let mut reader = subscribe(&app, &bob_again).await;
    // The reader keeps up, concurrently, while the stalled stream reads nothing.
    let total = 1500;
    let reading = tokio::spawn(async move {
        let mut received = 0;
        while received < total {
            match next_event(&mut reader, Duration::from_secs(10)).await {
                Some(Ok(Event::Created(_))) => received += 1,
                other => panic!("the reading subscriber was disturbed: {other:?}"),
            }
        }
        received
    });
    // Large enough that transport buffers (HTTP/2 windows) cannot hold them all.
    let padding = "p".repeat(7000);
    for i in 0..total {
        send(&app, &ann, text(bob.user_id, &format!("{i} {padding}")))
            .await
            .unwrap();
    }
    assert_eq!(
        reading.await.unwrap(),
        total,
        "a slow subscriber holds nobody back"
    );
    let mut delivered = 0;
    let ending = loop {
        match next_event(&mut stalled, SOON).await {
            Some(Ok(_)) => delivered += 1,
            Some(Err(status)) => break status,
            None => panic!("the stalled stream neither lagged nor ended after {delivered} events"),
        }
    };
    assert_eq!(ending.code(), Code::ResourceExhausted, "{ending:?}");
    assert!(ending.message().contains("behind"), "{}", ending.message());
    crate::errors::assert_reason(
        Err::<(), _>(ending),
        Code::ResourceExhausted,
        "STREAM_LAGGED",
    );
    assert!(delivered < total);
    app.stop().await;
}

/// A message for the storage layer directly: no reply, no request id, in
/// conversation "c", sent now.
fn plain_message(
    app: &TestApp,
    sender_id: i64,
    recipient_id: i64,
    content: &str,
) -> ai_message::storage::NewMessage {
    ai_message::storage::NewMessage {
        sender_id,
        recipient_id,
        content: content.into(),
        parent_id: None,
        conversation_id: "c".into(),
        now: app.state.clock.now().micros(),
        request: None,
    }
}

async fn a_failing_message_in_a_group_commit_fails_alone(backend: Backend) {
    use ai_message::storage::{StorageError, batch::MessageWriter};
    let app = spawn_app(backend).await;
    let ann = app.register("ann").await;
    let bob = app.register("bob").await;
    let message =
        |sender_id, recipient_id, content| plain_message(&app, sender_id, recipient_id, content);
    let count_sent = || app.count("SELECT COUNT(*) FROM messages WHERE sender_id = $1", ann.id);
    // One transaction: a message from a user who does not exist fails it whole.
    let together = app
        .state
        .db
        .insert_messages(vec![
            message(ann.id, bob.id, "fine"),
            message(987_654, bob.id, "orphan"),
        ])
        .await;
    assert!(together.is_err());
    assert_eq!(count_sent().await, 0, "all or nothing");
    // A missing or disabled recipient is refused alone, inside the transaction.
    app.execute("UPDATE users SET is_active = FALSE WHERE id = $1", bob.id)
        .await;
    let answers = app
        .state
        .db
        .insert_messages(vec![
            message(ann.id, ann.id, "note"),
            message(ann.id, 987_654, "nobody"),
            message(ann.id, bob.id, "disabled"),
        ])
        .await
        .unwrap();
    assert_eq!(answers[0].as_ref().unwrap().message.content, "note");
    assert!(matches!(
        answers[1],
        Err(StorageError::NotFound("recipient"))
    ));
    assert!(matches!(answers[2], Err(StorageError::RecipientDisabled)));
    assert_eq!(count_sent().await, 1);
    app.execute("UPDATE users SET is_active = TRUE WHERE id = $1", bob.id)
        .await;
    // Through the writer, queued together, only the bad one fails.
    let (_closing, never) = tokio::sync::watch::channel(false);
    let (writer, _task) =
        MessageWriter::start(std::sync::Arc::clone(&app.state.db), never).expect("writer starts");
    let (good, bad) = tokio::join!(
        writer.insert(message(ann.id, bob.id, "fine")),
        writer.insert(message(987_654, bob.id, "orphan"))
    );
    assert_eq!(good.unwrap().message.content, "fine");
    assert!(bad.is_err());
    assert_eq!(count_sent().await, 2);
    app.stop().await;
}

/// One group-commit batch with notes to oneself, both directions of a pair
/// and a third user (PostgreSQL writes such a batch as one statement, SQLite
/// statement by statement): every user's event ids are dense and follow the
/// message ids, the sender's comes first, and each conversation row holds
/// the newest message and the unread count.
async fn a_batch_of_sends_logs_dense_event_ids_and_merges_conversation_rows(backend: Backend) {
    use ai_message::storage::Before;
    let app = spawn_app(backend).await;
    let (ann, bob, cy) = (
        app.register("ann").await.id,
        app.register("bob").await.id,
        app.register("cyd").await.id,
    );
    let message =
        |sender_id, recipient_id, content| plain_message(&app, sender_id, recipient_id, content);
    let batches = [
        vec![
            message(ann, bob, "a1"),
            message(bob, ann, "b1"),
            message(ann, ann, "note"),
            message(ann, bob, "a2"),
            message(cy, bob, "c1"),
            message(ann, bob, "a1"),
        ],
        vec![message(bob, ann, "b2")],
    ];
    let mut logged = Vec::new();
    for batch in batches {
        let contents: Vec<String> = batch.iter().map(|m| m.content.clone()).collect();
        let answers = app.state.db.insert_messages(batch).await.unwrap();
        for (content, answer) in contents.iter().zip(answers) {
            let change = answer.unwrap();
            assert_eq!(&change.message.content, content, "answers in request order");
            logged.push(change);
        }
    }
    // The same content twice in one batch: two messages, the first asked first.
    assert!(logged[0].message.id < logged[5].message.id);
    for change in &logged {
        let audience: Vec<i64> = change.message.audience().collect();
        let users: Vec<i64> = change.event_ids.iter().map(|(user, _)| *user).collect();
        assert_eq!(
            users, audience,
            "one event per participant, the sender's first"
        );
    }
    for (user, events) in [(ann, 6), (bob, 6), (cy, 1)] {
        let mut ids: Vec<(i64, i64)> = logged
            .iter()
            .filter_map(|c| Some((c.message.id, c.event_id_for(user)?)))
            .collect();
        ids.sort_unstable();
        let event_ids: Vec<i64> = ids.iter().map(|(_, event_id)| *event_id).collect();
        assert_eq!(event_ids, (1..=events).collect::<Vec<_>>(), "user {user}");
        assert_eq!(app.state.db.latest_event_id(user).await.unwrap(), events);
        let log = app.state.db.events_after(user, 0, 100).await.unwrap();
        let in_log: Vec<(i64, i64)> = log.iter().map(|e| (e.message.id, e.event_id)).collect();
        assert_eq!(
            in_log, ids,
            "the log holds what the answers said, user {user}"
        );
    }
    let conversations = |user: i64| {
        let db = std::sync::Arc::clone(&app.state.db);
        async move {
            let rows = db
                .list_conversations(user, Before::START, 10)
                .await
                .unwrap();
            rows.into_iter()
                .map(|c| (c.other_user_id, c.last_message.content, c.unread_count))
                .collect::<Vec<_>>()
        }
    };
    assert_eq!(
        conversations(bob).await,
        [(ann, "b2".to_owned(), 3), (cy, "c1".to_owned(), 1)]
    );
    assert_eq!(
        conversations(ann).await,
        [(bob, "b2".to_owned(), 2), (ann, "note".to_owned(), 1)]
    );
    assert_eq!(conversations(cy).await, [(bob, "c1".to_owned(), 0)]);
    app.stop().await;
}

/// The first page of each filter, as the caller sees it now: (ids, read flags).
async fn first_pages(app: &TestApp, who: &LoggedIn, partner: i64) -> Vec<Vec<(i64, bool)>> {
    let filters = [
        proto::ListMessagesRequest::default(),
        proto::ListMessagesRequest {
            with_user_id: Some(partner),
            ..Default::default()
        },
        proto::ListMessagesRequest {
            unread_only: true,
            ..Default::default()
        },
        proto::ListMessagesRequest {
            page_size: 2,
            ..Default::default()
        },
    ];
    let mut pages = Vec::new();
    for filter in filters {
        let page = list(app, who, filter).await.unwrap();
        pages.push(page.messages.iter().map(|m| (m.id, m.is_read)).collect());
    }
    pages
}

async fn first_pages_show_every_change_at_once_under_every_filter(backend: Backend) {
    // First pages may be served from memory: each kind of write must show in
    // the very next list of both participants. On PostgreSQL the writes go
    // through another instance, whose writes this one's memory never sees.
    let app = spawn_app(backend).await;
    let sibling = match backend {
        Backend::Postgres => Some(app.spawn_sibling().await),
        Backend::Sqlite => None,
    };
    let writer = sibling.as_ref().unwrap_or(&app);
    let ann = app.register_and_login("ann").await;
    let ben = app.register_and_login("ben").await;
    let cal = app.register_and_login("cal").await;
    assert_eq!(first_pages(&app, &ben, ann.user_id).await, vec![vec![]; 4]);
    assert_eq!(first_pages(&app, &ann, ben.user_id).await, vec![vec![]; 4]);

    let first = send(writer, &ann, text(ben.user_id, "one"))
        .await
        .unwrap()
        .id;
    let second = send(writer, &ann, text(ben.user_id, "two"))
        .await
        .unwrap()
        .id;
    let unread = vec![(second, false), (first, false)];
    assert_eq!(
        first_pages(&app, &ben, ann.user_id).await,
        vec![
            unread.clone(),
            unread.clone(),
            unread.clone(),
            unread.clone()
        ],
        "new messages reach the recipient's pages"
    );
    assert_eq!(
        first_pages(&app, &ann, ben.user_id).await[0],
        unread,
        "and the sender's"
    );

    assert_eq!(mark_read(writer, &ben, vec![first]).await.unwrap(), 1);
    let after_read = vec![(second, false), (first, true)];
    assert_eq!(
        first_pages(&app, &ben, ann.user_id).await,
        vec![
            after_read.clone(),
            after_read.clone(),
            vec![(second, false)],
            after_read.clone()
        ],
        "a read shows at once"
    );
    assert_eq!(first_pages(&app, &ann, ben.user_id).await[0], after_read);

    delete(writer, &ann, second).await.unwrap();
    assert_eq!(
        first_pages(&app, &ben, ann.user_id).await,
        vec![
            vec![(first, true)],
            vec![(first, true)],
            vec![],
            vec![(first, true)]
        ],
        "a deletion shows at once"
    );
    assert_eq!(
        first_pages(&app, &ann, ben.user_id).await[0],
        vec![(first, true)]
    );

    let from_cal = send(writer, &cal, text(ben.user_id, "hi"))
        .await
        .unwrap()
        .id;
    assert_eq!(
        first_pages(&app, &ben, cal.user_id).await[0],
        vec![(from_cal, false), (first, true)]
    );
    let admin = app.superuser("root").await;
    writer
        .admin
        .clone()
        .delete_user(with_bearer(
            proto::DeleteUserRequest {
                user_id: cal.user_id,
            },
            &admin.access_token,
        ))
        .await
        .unwrap();
    assert_eq!(
        first_pages(&app, &ben, cal.user_id).await,
        vec![vec![(first, true)], vec![], vec![], vec![(first, true)]],
        "a deleted user's messages leave everyone's pages"
    );
    app.stop().await;
}

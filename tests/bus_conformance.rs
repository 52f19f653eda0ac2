//! One conformance suite for every event bus: the in-process bus and
//! RabbitMQ (the real broker on 127.0.0.1:5672, names unique to each test).

mod support;

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

use scaleout::bus::{
    BusError, BusMessage, DeadLetter, Delivery, EventBus, Subscriber, Subscription,
};
use support::bus::message;
use tokio::time::timeout;

/// Longest any single expected delivery may take.
const PATIENCE: Duration = Duration::from_secs(20);

fn subscription(service_type: &str, bindings: &[&str]) -> Subscription {
    Subscription {
        service_type: service_type.into(),
        bindings: bindings.iter().map(|b| (*b).to_owned()).collect(),
        prefetch: 50,
        max_attempts: 3,
    }
}

async fn next(subscriber: &mut Box<dyn Subscriber>) -> Delivery {
    timeout(PATIENCE, subscriber.next())
        .await
        .expect("a delivery in time")
        .expect("the subscription is open")
}

async fn publish_all(bus: &dyn EventBus, messages: &[BusMessage]) {
    for (i, result) in bus.publish(messages).await.into_iter().enumerate() {
        result.unwrap_or_else(|e| panic!("message {i} not confirmed: {e}"));
    }
}

/// Every service type gets every event; instances of one type share them.
async fn service_types_each_get_everything_and_instances_compete(bus: Arc<dyn EventBus>) {
    let types = ["projector", "audit"];
    let mut consumers = tokio::task::JoinSet::new();
    let total = 300;
    let (seen_tx, mut seen_rx) = tokio::sync::mpsc::unbounded_channel();
    for service_type in types {
        for instance in 0..3 {
            let mut subscriber = bus
                .subscribe(&subscription(service_type, &["#"]))
                .await
                .unwrap();
            let seen = seen_tx.clone();
            consumers.spawn(async move {
                while let Some(delivery) = subscriber.next().await {
                    seen.send((service_type, instance, delivery.message.message_id.clone()))
                        .unwrap();
                    delivery.ack().await.unwrap();
                }
            });
        }
    }
    let messages: Vec<_> = (1..=total)
        .map(|v| message("file", "scaleout.v1.FileRenamed", v))
        .collect();
    publish_all(bus.as_ref(), &messages).await;

    let mut per_type: BTreeMap<&str, Vec<String>> = BTreeMap::new();
    let mut instances: BTreeSet<(&str, i32)> = BTreeSet::new();
    while per_type.values().map(Vec::len).sum::<usize>() < 2 * total as usize {
        let (service_type, instance, id) = timeout(PATIENCE, seen_rx.recv())
            .await
            .expect("deliveries in time")
            .unwrap();
        per_type.entry(service_type).or_default().push(id);
        instances.insert((service_type, instance));
    }
    let published: BTreeSet<_> = messages.iter().map(|m| m.message_id.clone()).collect();
    for service_type in types {
        let ids = &per_type[service_type];
        let distinct: BTreeSet<_> = ids.iter().cloned().collect();
        assert_eq!(distinct, published, "{service_type} must see every message");
        assert_eq!(ids.len(), distinct.len(), "{service_type} got duplicates");
    }
    assert!(
        instances.len() > 2,
        "instances of a type should share the work: {instances:?}"
    );
    consumers.abort_all();
}

async fn bindings_filter_what_a_service_type_gets(bus: Arc<dyn EventBus>) {
    let mut files = bus
        .subscribe(&subscription("files", &["file.#"]))
        .await
        .unwrap();
    let mut counters = bus
        .subscribe(&subscription("counters", &["counter.#"]))
        .await
        .unwrap();
    let file = message("file", "scaleout.v1.FileCreated", 1);
    let counter = message("counter", "scaleout.v1.CounterIncremented", 1);
    publish_all(bus.as_ref(), &[file.clone(), counter.clone()]).await;
    let got_file = next(&mut files).await;
    assert_eq!(got_file.message, file);
    got_file.ack().await.unwrap();
    let got_counter = next(&mut counters).await;
    assert_eq!(got_counter.message, counter);
    got_counter.ack().await.unwrap();
    // Nothing else is waiting for either.
    let after = message("file", "scaleout.v1.FileDeleted", 2);
    publish_all(bus.as_ref(), std::slice::from_ref(&after)).await;
    assert_eq!(next(&mut files).await.message, after);
}

/// Messages sent behind others whose confirms are still outstanding (a
/// window of confirms in flight) are confirmed and delivered after them, in
/// the order they were sent.
async fn messages_sent_before_earlier_confirms_arrive_keep_their_order(bus: Arc<dyn EventBus>) {
    let mut counters = bus
        .subscribe(&subscription("counters", &["counter.#"]))
        .await
        .unwrap();
    let batches: Vec<Vec<BusMessage>> = (0..3)
        .map(|b| {
            (1..=100)
                .map(|v| message("counter", "scaleout.v1.CounterIncremented", b * 100 + v))
                .collect()
        })
        .collect();
    let mut in_flight = Vec::new();
    for batch in &batches {
        in_flight.push(bus.send(batch).await);
    }
    for confirms in in_flight {
        for (i, confirmed) in confirms.await.into_iter().enumerate() {
            confirmed.unwrap_or_else(|e| panic!("message {i} not confirmed: {e}"));
        }
    }
    for sent in batches.iter().flatten() {
        let got = next(&mut counters).await;
        assert_eq!(got.message.message_id, sent.message_id);
        got.ack().await.unwrap();
    }
}

async fn a_message_no_queue_wants_is_unroutable_not_dropped(bus: Arc<dyn EventBus>) {
    let _files = bus
        .subscribe(&subscription("files", &["file.#"]))
        .await
        .unwrap();
    let results = bus
        .publish(&[message("nobody", "scaleout.v1.Nothing", 1)])
        .await;
    assert!(
        matches!(results[..], [Err(BusError::Unroutable(_))]),
        "{results:?}"
    );
}

async fn a_retried_message_comes_back_with_its_attempt_count(bus: Arc<dyn EventBus>) {
    let mut subscriber = bus
        .subscribe(&subscription("retrying", &["#"]))
        .await
        .unwrap();
    let sent = message("file", "scaleout.v1.FileCreated", 1);
    publish_all(bus.as_ref(), std::slice::from_ref(&sent)).await;
    for attempt in 1..=2 {
        let delivery = next(&mut subscriber).await;
        assert_eq!((delivery.attempt, &delivery.message), (attempt, &sent));
        delivery.retry("not yet").await.unwrap();
    }
    let third = next(&mut subscriber).await;
    assert_eq!(third.attempt, 3);
    third.ack().await.unwrap();
    assert!(
        bus.dead_letters("retrying", 0, 10)
            .await
            .unwrap()
            .dead_letters
            .is_empty()
    );
}

async fn poison_is_parked_with_its_reason_and_replay_brings_it_back(bus: Arc<dyn EventBus>) {
    let mut subscriber = bus
        .subscribe(&subscription("parking", &["#"]))
        .await
        .unwrap();
    let failing = message("file", "scaleout.v1.FileCreated", 1);
    let undecodable = BusMessage {
        body: b"\xff not protobuf".to_vec(),
        ..message("file", "scaleout.v1.FileCreated", 2)
    };
    publish_all(bus.as_ref(), &[failing.clone(), undecodable.clone()]).await;

    // The undecodable one is parked at once; the failing one after 3 attempts.
    let mut attempts = 0;
    let mut parked = 0;
    while parked < 2 {
        let delivery = next(&mut subscriber).await;
        if delivery.message.envelope().is_err() {
            delivery.dead_letter("undecodable body").await.unwrap();
            parked += 1;
        } else {
            attempts += 1;
            let last = delivery.attempt == 3;
            delivery
                .retry(&format!("handler failed on attempt {attempts}"))
                .await
                .unwrap();
            parked += usize::from(last);
        }
    }
    assert_eq!(attempts, 3);

    let dead = bus
        .dead_letters("parking", 0, 10)
        .await
        .unwrap()
        .dead_letters;
    let by_id: BTreeMap<_, _> = dead
        .iter()
        .map(|d| (d.message.message_id.clone(), d))
        .collect();
    assert_eq!(by_id.len(), 2, "{dead:?}");
    let failed = by_id[&failing.message_id];
    assert_eq!(
        (failed.reason.as_str(), failed.attempts),
        ("handler failed on attempt 3", 3)
    );
    assert_eq!(failed.message.body, failing.body);
    let poison = by_id[&undecodable.message_id];
    assert_eq!(
        (poison.reason.as_str(), poison.attempts),
        ("undecodable body", 1)
    );
    // Listing leaves them parked.
    assert_eq!(
        bus.dead_letters("parking", 0, 10)
            .await
            .unwrap()
            .dead_letters
            .len(),
        2
    );

    assert_eq!(bus.replay_dead_letters("parking").await.unwrap(), 2);
    let mut replayed = BTreeSet::new();
    for _ in 0..2 {
        let delivery = next(&mut subscriber).await;
        assert_eq!(delivery.attempt, 1, "a replay starts its attempts afresh");
        replayed.insert(delivery.message.message_id.clone());
        delivery.ack().await.unwrap();
    }
    assert_eq!(
        replayed,
        BTreeSet::from([failing.message_id, undecodable.message_id])
    );
    assert!(
        bus.dead_letters("parking", 0, 10)
            .await
            .unwrap()
            .dead_letters
            .is_empty()
    );
}

/// Asking about a service type that never subscribed is NotFound, and
/// declares nothing (asking twice is still NotFound).
async fn admin_calls_for_an_unknown_service_type_find_nothing(bus: Arc<dyn EventBus>) {
    for _ in 0..2 {
        assert!(matches!(
            bus.dead_letters("never-subscribed", 0, 10).await,
            Err(BusError::UnknownServiceType(name)) if name == "never-subscribed"
        ));
        assert!(matches!(
            bus.replay_dead_letters("never-subscribed").await,
            Err(BusError::UnknownServiceType(_))
        ));
    }
}

/// A replay moves what was parked when it started, even while a consumer
/// parks every replayed message again at once: it reports that many and
/// returns instead of chasing its own tail.
async fn a_replay_moves_what_was_parked_when_it_started(bus: Arc<dyn EventBus>) {
    let mut subscriber = bus
        .subscribe(&subscription("reparking", &["#"]))
        .await
        .unwrap();
    let poison: Vec<BusMessage> = (1..=5)
        .map(|n| message("file", "scaleout.v1.FileCreated", n))
        .collect();
    publish_all(bus.as_ref(), &poison).await;
    for _ in 0..5 {
        next(&mut subscriber)
            .await
            .dead_letter("poison")
            .await
            .unwrap();
    }
    let reparking = tokio::spawn(async move {
        loop {
            next(&mut subscriber)
                .await
                .dead_letter("poison again")
                .await
                .unwrap();
        }
    });
    let replayed = tokio::time::timeout(
        Duration::from_secs(20),
        bus.replay_dead_letters("reparking"),
    )
    .await
    .expect("the replay returns");
    assert_eq!(replayed.unwrap(), 5);
    reparking.abort();
}

async fn prefetch_bounds_unsettled_deliveries(bus: Arc<dyn EventBus>) {
    let mut small = subscription("bounded", &["#"]);
    small.prefetch = 2;
    let mut subscriber = bus.subscribe(&small).await.unwrap();
    let messages: Vec<_> = (1..=3)
        .map(|v| message("file", "scaleout.v1.FileCreated", v))
        .collect();
    publish_all(bus.as_ref(), &messages).await;
    let first = next(&mut subscriber).await;
    let _second = next(&mut subscriber).await;
    // A third delivery may only come once one of the two is settled.
    assert!(
        timeout(Duration::from_millis(300), subscriber.next())
            .await
            .is_err(),
        "a third delivery arrived past the prefetch of 2"
    );
    first.ack().await.unwrap();
    next(&mut subscriber).await.ack().await.unwrap();
}

async fn a_subscriber_that_goes_away_hands_back_what_it_held(bus: Arc<dyn EventBus>) {
    let mut leaving = bus
        .subscribe(&subscription("handover", &["#"]))
        .await
        .unwrap();
    let sent = message("file", "scaleout.v1.FileCreated", 1);
    publish_all(bus.as_ref(), std::slice::from_ref(&sent)).await;
    let held = next(&mut leaving).await;
    assert_eq!(held.message, sent);
    drop(held);
    drop(leaving);
    let mut staying = bus
        .subscribe(&subscription("handover", &["#"]))
        .await
        .unwrap();
    let again = next(&mut staying).await;
    assert_eq!(again.message, sent);
    assert_eq!(again.attempt, 2, "the hand-back counts as a delivery");
    again.ack().await.unwrap();
}

/// A message whose every attempt ended with its consumer gone (no verdict)
/// is parked by the next subscriber with its count, not handled a fourth
/// time and not left to the broker (which would park it with no count).
async fn a_message_its_consumers_keep_dropping_is_parked_with_its_count(bus: Arc<dyn EventBus>) {
    let sent = message("file", "scaleout.v1.FileCreated", 1);
    for attempt in 1..=3 {
        let mut crashing = bus
            .subscribe(&subscription("dropping", &["#"]))
            .await
            .unwrap();
        if attempt == 1 {
            publish_all(bus.as_ref(), std::slice::from_ref(&sent)).await;
        }
        let held = next(&mut crashing).await;
        assert_eq!(held.attempt, attempt);
        drop(held);
        drop(crashing);
    }
    let mut subscriber = bus
        .subscribe(&subscription("dropping", &["#"]))
        .await
        .unwrap();
    // It parks the message as it arrives and goes on waiting for the next.
    let handed_out = tokio::spawn(async move { subscriber.next().await.map(|d| d.message) });
    let parked = wait_for_dead_letters(bus.as_ref(), "dropping", 1).await;
    assert!(
        !handed_out.is_finished(),
        "a message past its attempts was handed out: {:?}",
        handed_out.await
    );
    handed_out.abort();
    assert_eq!(parked[0].message, sent);
    assert_eq!(parked[0].attempts, 4, "{parked:?}");
    assert!(
        parked[0]
            .reason
            .contains("handed back unsettled after its 3 attempts")
    );
}

/// Dead letters page in the order they were parked.
async fn dead_letters_page_in_order(bus: Arc<dyn EventBus>) {
    let mut subscriber = bus
        .subscribe(&subscription("paging", &["#"]))
        .await
        .unwrap();
    let sent: Vec<BusMessage> = (1..=5)
        .map(|n| message("file", "scaleout.v1.FileCreated", n))
        .collect();
    publish_all(bus.as_ref(), &sent).await;
    for n in 1..=5 {
        next(&mut subscriber)
            .await
            .dead_letter(&format!("poison {n}"))
            .await
            .unwrap();
    }
    wait_for_dead_letters(bus.as_ref(), "paging", 5).await;
    let page = bus.dead_letters("paging", 2, 2).await.unwrap();
    assert_eq!(page.parked, 5);
    let reasons: Vec<&str> = page
        .dead_letters
        .iter()
        .map(|d| d.reason.as_str())
        .collect();
    assert_eq!(reasons, ["poison 3", "poison 4"]);
    let last = bus.dead_letters("paging", 4, 10).await.unwrap();
    assert_eq!(last.dead_letters.len(), 1);
}

/// The dead letters once at least `count` are parked (a park is confirmed
/// before it returns, but a broker-side one has no caller to wait on).
async fn wait_for_dead_letters(
    bus: &dyn EventBus,
    service_type: &str,
    count: usize,
) -> Vec<DeadLetter> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let page = bus.dead_letters(service_type, 0, 100).await.unwrap();
        if page.dead_letters.len() >= count {
            return page.dead_letters;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{count} dead letters never arrived: {page:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

macro_rules! conformance {
    ($backend:ident: $($case:ident),+ $(,)?) => {
        mod $backend {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $case() {
                    crate::support::bus::$backend(|bus| super::$case(bus)).await;
                }
            )+
        }
    };
}

macro_rules! all_cases {
    ($backend:ident) => {
        conformance!($backend:
            service_types_each_get_everything_and_instances_compete,
            bindings_filter_what_a_service_type_gets,
            messages_sent_before_earlier_confirms_arrive_keep_their_order,
            a_message_no_queue_wants_is_unroutable_not_dropped,
            a_retried_message_comes_back_with_its_attempt_count,
            poison_is_parked_with_its_reason_and_replay_brings_it_back,
            prefetch_bounds_unsettled_deliveries,
            a_subscriber_that_goes_away_hands_back_what_it_held,
            admin_calls_for_an_unknown_service_type_find_nothing,
            a_replay_moves_what_was_parked_when_it_started,
            a_message_its_consumers_keep_dropping_is_parked_with_its_count,
            dead_letters_page_in_order,
        );
    };
}

all_cases!(memory);
all_cases!(rabbitmq);

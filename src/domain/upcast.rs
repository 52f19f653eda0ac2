//! Reading events stored in an older shape as the current ones.
//!
//! A stored event's type name is its shape's version. A change Protobuf
//! reads by itself (a field renamed but keeping its number, a field added)
//! needs nothing; a change it cannot (a field renumbered or retyped, one
//! event split in two) gets a new message, and the old one is kept only to
//! be read. An upcaster turns a stored event of an old type into the current
//! events it stands for, and every read path applies it (loading an
//! aggregate, projecting a delivery or a page of the log, rebuilding,
//! verifying, the read API), so nothing past the store sees an old shape and
//! no stored event is ever rewritten.
//!
//! The events one stored event reads as share its stream version and log
//! position: they were decided together, and they apply together.

use std::collections::HashMap;
use std::fmt;
use std::sync::Arc;

use uuid::Uuid;

use super::{DomainEvent, UnknownEvent};

/// One event as it reads now: its current type name and encoding.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Upcast {
    pub event_type: String,
    pub payload: Vec<u8>,
}

type Convert = dyn Fn(&[u8]) -> Result<Vec<Upcast>, String> + Send + Sync;

struct Upcaster {
    /// Every type it may produce: what a filter on one of them must also read.
    into: Vec<String>,
    convert: Box<Convert>,
}

/// The application's upcasters, by the old type name each reads.
#[derive(Clone, Default)]
pub struct Upcasters {
    by_type: HashMap<String, Arc<Upcaster>>,
}

impl fmt::Debug for Upcasters {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_set().entries(self.by_type.keys()).finish()
    }
}

impl Upcasters {
    /// Reads stored `Old` events as the current events `convert` makes of
    /// them: one for a changed shape, several for an event split up. The
    /// events must be current ones: they are not upcast again.
    ///
    /// # Panics
    ///
    /// When `Old` already has an upcaster: the application is wired wrong.
    pub fn upcast<Old, E>(mut self, convert: fn(Old) -> Vec<E>) -> Self
    where
        Old: prost::Message + prost::Name + Default + 'static,
        E: DomainEvent,
    {
        let from = Old::full_name();
        let upcaster = Upcaster {
            into: E::types(),
            convert: Box::new(move |payload| {
                let old = Old::decode(payload).map_err(|e| e.to_string())?;
                Ok(convert(old)
                    .iter()
                    .map(|event| Upcast {
                        event_type: event.event_type(),
                        payload: event.encode(),
                    })
                    .collect())
            }),
        };
        let previous = self.by_type.insert(from.clone(), Arc::new(upcaster));
        assert!(previous.is_none(), "two upcasters read {from}");
        self
    }

    /// Whether stored events of `event_type` are read through an upcaster.
    pub fn reads(&self, event_type: &str) -> bool {
        self.by_type.contains_key(event_type)
    }

    /// The old types whose events may read as `current`.
    pub fn read_as<'a>(&'a self, current: &'a str) -> impl Iterator<Item = &'a str> + 'a {
        self.by_type
            .iter()
            .filter(move |(_, upcaster)| upcaster.into.iter().any(|t| t == current))
            .map(|(old, _)| old.as_str())
    }

    /// A stored event as the events it reads as now: itself, unless its type
    /// has an upcaster.
    pub fn read(&self, event_type: String, payload: Vec<u8>) -> Result<Vec<Upcast>, UnknownEvent> {
        let Some(upcaster) = self.by_type.get(&event_type) else {
            return Ok(vec![Upcast {
                event_type,
                payload,
            }]);
        };
        (upcaster.convert)(&payload).map_err(|reason| UnknownEvent {
            reason: format!("its upcaster cannot read it: {reason}"),
            event_type,
        })
    }
}

/// The id of the `part`th event one stored event reads as: the stored
/// event's own for the first, and for the others one derived from it, so
/// that every reader gives each part the same distinct id.
pub fn part_id(event_id: Uuid, part: usize) -> Uuid {
    match part {
        0 => event_id,
        part => Uuid::new_v5(&event_id, &(part as u64).to_be_bytes()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct Old {
        #[prost(uint64, tag = "1")]
        pub cents: u64,
    }

    impl prost::Name for Old {
        const NAME: &'static str = "Paid";
        const PACKAGE: &'static str = "shop.v0";
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct Paid {
        #[prost(uint64, tag = "2")]
        pub amount: u64,
    }

    impl prost::Name for Paid {
        const NAME: &'static str = "Paid";
        const PACKAGE: &'static str = "shop.v1";
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct Tipped {
        #[prost(uint64, tag = "1")]
        pub amount: u64,
    }

    impl prost::Name for Tipped {
        const NAME: &'static str = "Tipped";
        const PACKAGE: &'static str = "shop.v1";
    }

    crate::domain_event!(ShopEvent {
        Paid(Paid),
        Tipped(Tipped),
    });

    /// v0 paid a cent amount that held the tip above 1,000; v1 splits it.
    fn split(old: Old) -> Vec<ShopEvent> {
        let tip = old.cents.saturating_sub(1000);
        let mut events = vec![ShopEvent::Paid(Paid {
            amount: old.cents - tip,
        })];
        if tip > 0 {
            events.push(ShopEvent::Tipped(Tipped { amount: tip }));
        }
        events
    }

    fn stored(cents: u64) -> Vec<u8> {
        prost::Message::encode_to_vec(&Old { cents })
    }

    fn decoded(upcast: &[Upcast]) -> Vec<ShopEvent> {
        upcast
            .iter()
            .map(|u| ShopEvent::decode(&u.event_type, &u.payload).unwrap())
            .collect()
    }

    #[test]
    fn an_old_event_reads_as_the_current_ones_and_a_current_one_as_itself() {
        let upcasters = Upcasters::default().upcast(split);
        assert!(upcasters.reads("shop.v0.Paid"));
        let read = upcasters.read("shop.v0.Paid".into(), stored(1250)).unwrap();
        assert_eq!(
            decoded(&read),
            [
                ShopEvent::Paid(Paid { amount: 1000 }),
                ShopEvent::Tipped(Tipped { amount: 250 })
            ]
        );
        let read = upcasters.read("shop.v0.Paid".into(), stored(700)).unwrap();
        assert_eq!(decoded(&read), [ShopEvent::Paid(Paid { amount: 700 })]);
        let current = ShopEvent::Tipped(Tipped { amount: 5 });
        let read = upcasters
            .read(current.event_type(), current.encode())
            .unwrap();
        assert_eq!(decoded(&read), [current]);
    }

    #[test]
    fn an_old_event_that_does_not_decode_is_unknown_with_the_reason() {
        let upcasters = Upcasters::default().upcast(split);
        let error = upcasters
            .read("shop.v0.Paid".into(), vec![0xff, 0xff])
            .unwrap_err();
        assert_eq!(error.event_type, "shop.v0.Paid");
        assert!(
            error.reason.starts_with("its upcaster cannot read it: "),
            "{error}"
        );
    }

    #[test]
    fn a_filter_on_a_current_type_finds_the_old_types_that_read_as_it() {
        let upcasters = Upcasters::default().upcast(split);
        let old: Vec<&str> = upcasters.read_as("shop.v1.Tipped").collect();
        assert_eq!(old, ["shop.v0.Paid"]);
        assert_eq!(upcasters.read_as("shop.v1.Refunded").count(), 0);
    }

    #[test]
    fn parts_have_distinct_ids_every_reader_derives_alike() {
        let id = Uuid::now_v7();
        assert_eq!(part_id(id, 0), id);
        assert_ne!(part_id(id, 1), id);
        assert_eq!(part_id(id, 1), part_id(id, 1));
        assert_ne!(part_id(id, 1), part_id(id, 2));
    }

    #[test]
    #[should_panic(expected = "two upcasters read shop.v0.Paid")]
    fn one_old_type_has_one_upcaster() {
        let _ = Upcasters::default().upcast(split).upcast(split);
    }
}

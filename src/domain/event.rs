//! How domain events become stored bytes and back.
//!
//! An aggregate's event type is an enum over generated Protobuf messages,
//! declared with [`domain_event!`](crate::domain_event); its stored type name is the message's
//! Protobuf full name (e.g. `scaleout.v1.FileRenamed`), never a Rust path, so
//! renaming Rust code never orphans stored events.

/// An event an aggregate emits and folds.
pub trait DomainEvent: Sized + Clone + std::fmt::Debug + Send + Sync + 'static {
    /// The stable type name stored beside the payload.
    fn event_type(&self) -> String;
    /// The Protobuf encoding of the payload.
    fn encode(&self) -> Vec<u8>;
    /// Reads a stored event back.
    fn decode(event_type: &str, payload: &[u8]) -> Result<Self, UnknownEvent>;
    /// Every type name this event enum stores.
    fn types() -> Vec<String>;
}

/// A stored event this aggregate cannot read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("cannot decode event {event_type}: {reason}")]
pub struct UnknownEvent {
    pub event_type: String,
    pub reason: String,
}

/// Whether `event_type` is the full name of the message `M`; used by
/// [`domain_event!`](crate::domain_event).
pub fn is_type<M: prost::Name>(event_type: &str) -> bool {
    event_type
        .strip_prefix(M::PACKAGE)
        .and_then(|rest| rest.strip_prefix('.'))
        == Some(M::NAME)
}

/// Declares an aggregate's event enum, one variant per Protobuf message,
/// and implements [`DomainEvent`] for it. The crate using it needs `prost`.
///
/// ```
/// #[derive(Clone, PartialEq, prost::Message)]
/// pub struct AccountOpened {
///     #[prost(string, tag = "1")]
///     pub owner: String,
/// }
///
/// impl prost::Name for AccountOpened {
///     const NAME: &'static str = "AccountOpened";
///     const PACKAGE: &'static str = "bank.v1";
/// }
///
/// scaleout::domain_event!(
///     /// Everything that happens to an account.
///     AccountEvent {
///         Opened(AccountOpened),
///     }
/// );
///
/// use scaleout::domain::DomainEvent;
/// let opened = AccountEvent::Opened(AccountOpened { owner: "Ada".into() });
/// assert_eq!(opened.event_type(), "bank.v1.AccountOpened");
/// let stored = opened.encode();
/// assert_eq!(AccountEvent::decode("bank.v1.AccountOpened", &stored).unwrap(), opened);
/// assert!(AccountEvent::decode("bank.v1.Closed", &stored).is_err());
/// ```
#[macro_export]
macro_rules! domain_event {
    ($(#[$meta:meta])* $name:ident { $($variant:ident($message:ty)),+ $(,)? }) => {
        $(#[$meta])*
        #[derive(Debug, Clone, PartialEq)]
        pub enum $name {
            $($variant($message)),+
        }

        impl $crate::domain::DomainEvent for $name {
            fn event_type(&self) -> String {
                match self {
                    $(Self::$variant(_) => <$message as prost::Name>::full_name()),+
                }
            }

            fn encode(&self) -> Vec<u8> {
                match self {
                    $(Self::$variant(message) => prost::Message::encode_to_vec(message)),+
                }
            }

            fn decode(event_type: &str, payload: &[u8]) -> Result<Self, $crate::domain::UnknownEvent> {
                let unknown = |reason: String| $crate::domain::UnknownEvent {
                    event_type: event_type.to_owned(),
                    reason,
                };
                $(
                    if $crate::domain::is_type::<$message>(event_type) {
                        return <$message as prost::Message>::decode(payload)
                            .map(Self::$variant)
                            .map_err(|e| unknown(e.to_string()));
                    }
                )+
                Err(unknown(format!("not an event of {}", stringify!($name))))
            }

            fn types() -> Vec<String> {
                vec![$(<$message as prost::Name>::full_name()),+]
            }
        }
    };
}

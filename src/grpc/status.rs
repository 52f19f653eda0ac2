//! The one place kernel errors become gRPC statuses, with `google.rpc` details.
//!
//! | error | code | detail |
//! | --- | --- | --- |
//! | invalid input | `INVALID_ARGUMENT` | `BadRequest` naming each field |
//! | unknown aggregate | `NOT_FOUND` | `ResourceInfo` |
//! | duplicate create | `ALREADY_EXISTS` | `ResourceInfo` |
//! | state forbids it | `FAILED_PRECONDITION` | `PreconditionFailure` |
//! | version conflict | `ABORTED` | `ErrorInfo` `WRONG_EXPECTED_VERSION` |
//! | store down | `UNAVAILABLE` | `ErrorInfo` `STORE_UNAVAILABLE` |
//! | store kept losing races with other processes | `ABORTED` | `ErrorInfo` `STORE_CONTENDED` |
//! | bus down | `UNAVAILABLE` | `ErrorInfo` `BUS_UNAVAILABLE` |
//! | view behind `min_version` at the deadline | `UNAVAILABLE` | `ErrorInfo` `VIEW_NOT_CAUGHT_UP` |
//! | read model never built yet (its first build runs) | `UNAVAILABLE` | `ErrorInfo` `READ_MODEL_BUILDING` |
//! | document store down | `UNAVAILABLE` | `ErrorInfo` `DOCUMENT_STORE_UNAVAILABLE` |
//! | a stored event the application cannot read | `INTERNAL` | `ErrorInfo` `EVENT_UNREADABLE` naming its stream, version and position |
//! | anything else | `INTERNAL` | none: the cause is logged, not leaked |

use std::collections::HashMap;

use tonic::{Code, Status};
use tonic_types::{ErrorDetails, FieldViolation, StatusExt};

use crate::bus::BusError;
use crate::command::CommandError;
use crate::documents::DocumentError;
use crate::domain::{DomainError, UnknownEvent};
use crate::query::QueryError;
use crate::store::StoreError;

/// The `ErrorInfo.domain` of every error this platform reports.
pub const ERROR_DOMAIN: &str = "scaleout";

/// Longest description of one invalid field. A description may quote the
/// input, and a status travels in HTTP/2 headers, which clients cap (at 8
/// KiB in several gRPC implementations): a longer one would reach the
/// caller as a transport error instead of the reason.
const MAX_DESCRIPTION_BYTES: usize = 512;

/// `text` cut to at most `max` bytes, at a character boundary.
pub(super) fn clip(mut text: String, max: usize) -> String {
    if text.len() > max {
        let end = (0..=max)
            .rev()
            .find(|&i| text.is_char_boundary(i))
            .unwrap_or(0);
        text.truncate(end);
    }
    text
}

/// `text` cut to [`MAX_DESCRIPTION_BYTES`], with a mark where it was cut:
/// how a refusal quotes what the caller sent.
pub(crate) fn clip_marked(text: String) -> String {
    if text.len() <= MAX_DESCRIPTION_BYTES {
        return text;
    }
    let mut clipped = clip(text, MAX_DESCRIPTION_BYTES - '…'.len_utf8());
    clipped.push('…');
    clipped
}

/// Collects every invalid field of a request, so one answer names them all.
#[derive(Debug, Default)]
pub struct Violations(Vec<FieldViolation>);

impl Violations {
    /// Keeps a parsed value, or records why `field` was refused.
    pub fn check<T, E: std::fmt::Display>(
        &mut self,
        field: &str,
        parsed: Result<T, E>,
    ) -> Option<T> {
        parsed
            .map_err(|error| {
                let violation = FieldViolation::new(field, clip_marked(error.to_string()));
                self.0.push(violation)
            })
            .ok()
    }

    /// The `INVALID_ARGUMENT` status naming every recorded field.
    pub fn into_status(self) -> Status {
        let summary = self
            .0
            .iter()
            .map(|v| format!("{}: {}", v.field, v.description))
            .collect::<Vec<_>>()
            .join("; ");
        Status::with_error_details(
            Code::InvalidArgument,
            format!("invalid request: {summary}"),
            ErrorDetails::with_bad_request(self.0),
        )
    }
}

impl From<CommandError> for Status {
    fn from(error: CommandError) -> Self {
        match error {
            CommandError::Domain(error) => error.into(),
            CommandError::Store(error) => error.into(),
            CommandError::Unreadable {
                stream,
                version,
                position,
                source,
            } => unreadable_event(&stream, version, position, &source),
        }
    }
}

/// A stored event the application cannot read (an unknown type, a payload
/// that does not decode, an upcaster that fails on it): named by where it
/// sits, so that someone can look at it; nothing is skipped.
pub(crate) fn unreadable_event(
    stream: &str,
    version: u64,
    position: u64,
    error: &UnknownEvent,
) -> Status {
    tracing::error!(stream, version, position, %error, "a stored event cannot be read");
    Status::with_error_details(
        Code::Internal,
        format!(
            "stream {stream} holds an event this application cannot read, at version {version} \
             (log position {position}): {error}"
        ),
        ErrorDetails::with_error_info(
            "EVENT_UNREADABLE",
            ERROR_DOMAIN,
            HashMap::from([
                ("stream".to_owned(), stream.to_owned()),
                ("version".to_owned(), version.to_string()),
                ("position".to_owned(), position.to_string()),
                ("event_type".to_owned(), error.event_type.clone()),
            ]),
        ),
    )
}

impl From<DomainError> for Status {
    fn from(error: DomainError) -> Self {
        let message = error.to_string();
        match error {
            DomainError::NotFound { kind, id } => Status::with_error_details(
                Code::NotFound,
                message,
                ErrorDetails::with_resource_info(kind, id, "", "not found"),
            ),
            DomainError::AlreadyExists { kind, id } => Status::with_error_details(
                Code::AlreadyExists,
                message,
                ErrorDetails::with_resource_info(kind, id, "", "already exists"),
            ),
            DomainError::Precondition {
                rule,
                subject,
                description,
            } => Status::with_error_details(
                Code::FailedPrecondition,
                message,
                ErrorDetails::with_precondition_failure_violation(rule, subject, description),
            ),
        }
    }
}

impl From<StoreError> for Status {
    fn from(error: StoreError) -> Self {
        let message = error.to_string();
        match error {
            StoreError::WrongExpectedVersion {
                stream,
                expected,
                actual,
            } => Status::with_error_details(
                Code::Aborted,
                message,
                ErrorDetails::with_error_info(
                    "WRONG_EXPECTED_VERSION",
                    ERROR_DOMAIN,
                    HashMap::from([
                        ("stream".to_owned(), stream),
                        ("expected".to_owned(), expected.to_string()),
                        ("actual".to_owned(), actual.to_string()),
                    ]),
                ),
            ),
            StoreError::RequestIdReused { .. } => Status::with_error_details(
                Code::InvalidArgument,
                message.clone(),
                ErrorDetails::with_bad_request_violation("request_id", message),
            ),
            StoreError::Unavailable { .. } => Status::with_error_details(
                Code::Unavailable,
                message,
                ErrorDetails::with_error_info("STORE_UNAVAILABLE", ERROR_DOMAIN, HashMap::new()),
            ),
            // Nothing was written and the same request will most likely go
            // through: a conflict to retry, like a lost race.
            StoreError::Contended { .. } => Status::with_error_details(
                Code::Aborted,
                message,
                ErrorDetails::with_error_info("STORE_CONTENDED", ERROR_DOMAIN, HashMap::new()),
            ),
            error @ StoreError::Backend { .. } => internal(&error),
        }
    }
}

impl From<BusError> for Status {
    fn from(error: BusError) -> Self {
        match error {
            BusError::UnknownServiceType(ref service_type) => Status::with_error_details(
                Code::NotFound,
                error.to_string(),
                ErrorDetails::with_resource_info(
                    "service_type",
                    service_type.clone(),
                    "",
                    "never subscribed",
                ),
            ),
            BusError::Unavailable { .. } => Status::with_error_details(
                Code::Unavailable,
                error.to_string(),
                ErrorDetails::with_error_info("BUS_UNAVAILABLE", ERROR_DOMAIN, HashMap::new()),
            ),
            error => internal(&error),
        }
    }
}

impl From<QueryError> for Status {
    fn from(error: QueryError) -> Self {
        let message = error.to_string();
        match error {
            QueryError::NotFound { kind, id } => Status::with_error_details(
                Code::NotFound,
                message,
                ErrorDetails::with_resource_info(kind, id, "", "no such read model (yet)"),
            ),
            QueryError::NotCaughtUp {
                stream,
                wanted,
                current,
                ..
            } => Status::with_error_details(
                Code::Unavailable,
                message,
                ErrorDetails::with_error_info(
                    "VIEW_NOT_CAUGHT_UP",
                    ERROR_DOMAIN,
                    HashMap::from([
                        ("stream".to_owned(), stream),
                        ("wanted".to_owned(), wanted.to_string()),
                        ("current".to_owned(), current.to_string()),
                    ]),
                ),
            ),
            QueryError::Building { projection, .. } => Status::with_error_details(
                Code::Unavailable,
                message,
                ErrorDetails::with_error_info(
                    "READ_MODEL_BUILDING",
                    ERROR_DOMAIN,
                    HashMap::from([("projection".to_owned(), projection.to_owned())]),
                ),
            ),
            QueryError::Store(error) => error.into(),
            error => internal(&error),
        }
    }
}

impl From<DocumentError> for Status {
    fn from(error: DocumentError) -> Self {
        match error {
            DocumentError::Unavailable { .. } => Status::with_error_details(
                Code::Unavailable,
                error.to_string(),
                ErrorDetails::with_error_info(
                    "DOCUMENT_STORE_UNAVAILABLE",
                    ERROR_DOMAIN,
                    HashMap::new(),
                ),
            ),
            error => internal(&error),
        }
    }
}

/// A subscriber that left its buffer full for too long: its subscription
/// ends; it may resume from its last position.
pub(crate) fn subscriber_too_slow(buffer: usize, waited: std::time::Duration) -> Status {
    Status::with_error_details(
        Code::ResourceExhausted,
        format!(
            "subscription ended: the client left {buffer} messages unread for {waited:?}; \
             resume from the last position received + 1"
        ),
        ErrorDetails::with_error_info(
            "SUBSCRIBER_TOO_SLOW",
            ERROR_DOMAIN,
            HashMap::from([
                ("buffered".to_owned(), buffer.to_string()),
                ("waited_ms".to_owned(), waited.as_millis().to_string()),
            ]),
        ),
    )
}

/// Dead letters asked of a server that runs without an event bus.
pub(crate) fn no_event_bus() -> Status {
    Status::with_error_details(
        Code::FailedPrecondition,
        "this server has no event bus, so nothing is parked here: \
         ask a command-svc or projector that runs with one",
        ErrorDetails::with_precondition_failure_violation(
            "NO_EVENT_BUS",
            "event bus",
            "this server runs without an event bus",
        ),
    )
}

/// Every subscription slot is taken.
pub(crate) fn too_many_subscriptions(max: usize) -> Status {
    Status::with_error_details(
        Code::ResourceExhausted,
        format!("this server already serves {max} subscriptions; try again later"),
        ErrorDetails::with_error_info(
            "TOO_MANY_SUBSCRIPTIONS",
            ERROR_DOMAIN,
            HashMap::from([("max".to_owned(), max.to_string())]),
        ),
    )
}

/// A failure that is not the caller's: logged in full, reported without internals.
pub(super) fn internal(error: &dyn std::error::Error) -> Status {
    tracing::error!(%error, "internal error");
    Status::internal("internal error; the server log has the details")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::ExpectedVersion;

    #[test]
    fn a_quoted_input_is_cut_at_a_character_boundary_and_marked() {
        let fits = "x".repeat(MAX_DESCRIPTION_BYTES);
        assert_eq!(clip_marked(fits.clone()), fits);
        let cut = clip_marked("x".repeat(MAX_DESCRIPTION_BYTES + 1));
        assert_eq!(cut.len(), MAX_DESCRIPTION_BYTES);
        assert!(cut.ends_with('…'));
        // A two-byte character across the cut is left out whole.
        let straddling = format!("{}é{}", "x".repeat(508), "x".repeat(10));
        let cut = clip_marked(straddling);
        assert_eq!(cut, format!("{}…", "x".repeat(508)));
    }

    #[test]
    fn wrong_expected_version_is_aborted_with_error_info() {
        let status = Status::from(StoreError::WrongExpectedVersion {
            stream: "file-a".into(),
            expected: ExpectedVersion::Exact(3),
            actual: 4,
        });
        assert_eq!(status.code(), Code::Aborted);
        let info = status.get_details_error_info().expect("ErrorInfo");
        assert_eq!(info.reason, "WRONG_EXPECTED_VERSION");
        assert_eq!(info.domain, ERROR_DOMAIN);
        assert_eq!(info.metadata["stream"], "file-a");
        assert_eq!(info.metadata["expected"], "3");
        assert_eq!(info.metadata["actual"], "4");
    }

    #[test]
    fn violations_become_a_bad_request_naming_each_field() {
        let mut violations = Violations::default();
        assert_eq!(violations.check("ok", Ok::<_, String>(1)), Some(1));
        assert_eq!(
            violations.check::<(), _>("name", Err("must not be empty")),
            None
        );
        assert_eq!(violations.check::<(), _>("file_id", Err("too long")), None);
        let status = violations.into_status();
        assert_eq!(status.code(), Code::InvalidArgument);
        let fields: Vec<_> = status
            .get_details_bad_request()
            .expect("BadRequest")
            .field_violations
            .into_iter()
            .map(|v| v.field)
            .collect();
        assert_eq!(fields, ["name", "file_id"]);
    }

    #[test]
    fn domain_errors_map_to_their_codes() {
        let not_found = Status::from(DomainError::NotFound {
            kind: "file",
            id: "a".into(),
        });
        assert_eq!(not_found.code(), Code::NotFound);
        assert_eq!(
            not_found.get_details_resource_info().unwrap().resource_name,
            "a"
        );
        let exists = Status::from(DomainError::AlreadyExists {
            kind: "file",
            id: "a".into(),
        });
        assert_eq!(exists.code(), Code::AlreadyExists);
        let refused = Status::from(DomainError::Precondition {
            rule: "FILE_DELETED",
            subject: "file/a".into(),
            description: "file a was deleted".into(),
        });
        assert_eq!(refused.code(), Code::FailedPrecondition);
        let violation = &refused
            .get_details_precondition_failure()
            .unwrap()
            .violations[0];
        assert_eq!(violation.r#type, "FILE_DELETED");
    }

    #[test]
    fn store_failures_are_unavailable_or_internal_without_internals() {
        assert_eq!(
            Status::from(StoreError::unavailable("down")).code(),
            Code::Unavailable
        );
        let internal = Status::from(StoreError::backend("disk on fire at /var/x"));
        assert_eq!(internal.code(), Code::Internal);
        assert!(!internal.message().contains("/var/x"));
    }

    #[test]
    fn a_store_that_kept_losing_races_is_aborted_to_retry_not_internal() {
        let contended = StoreError::Contended {
            context: "still losing races after 5 attempts".into(),
            cause: None,
        };
        assert!(contended.is_transient());
        let status = Status::from(contended);
        assert_eq!(status.code(), Code::Aborted);
        assert_eq!(
            status.get_details_error_info().unwrap().reason,
            "STORE_CONTENDED"
        );
    }

    #[test]
    fn bus_failures_are_unavailable_or_internal() {
        let down = Status::from(BusError::unavailable("connection refused"));
        assert_eq!(down.code(), Code::Unavailable);
        assert_eq!(
            down.get_details_error_info().unwrap().reason,
            "BUS_UNAVAILABLE"
        );
        assert_eq!(
            Status::from(BusError::Nacked("k".into())).code(),
            Code::Internal
        );
        let unknown = Status::from(BusError::UnknownServiceType("nope".into()));
        assert_eq!(unknown.code(), Code::NotFound);
        assert_eq!(
            unknown.get_details_resource_info().unwrap().resource_name,
            "nope"
        );
    }

    #[test]
    fn a_view_behind_is_unavailable_with_what_it_reflects() {
        let status = Status::from(QueryError::NotCaughtUp {
            kind: "counter",
            id: "c".into(),
            stream: "counter-c".into(),
            wanted: 9,
            current: 7,
        });
        assert_eq!(status.code(), Code::Unavailable);
        let info = status.get_details_error_info().unwrap();
        assert_eq!(info.reason, "VIEW_NOT_CAUGHT_UP");
        assert_eq!(
            (
                info.metadata["wanted"].as_str(),
                info.metadata["current"].as_str()
            ),
            ("9", "7")
        );
        let missing = Status::from(QueryError::NotFound {
            kind: "file",
            id: "f".into(),
        });
        assert_eq!(missing.code(), Code::NotFound);
    }

    #[test]
    fn a_slow_subscriber_is_resource_exhausted_with_error_info() {
        let status = subscriber_too_slow(8, std::time::Duration::from_millis(1500));
        assert_eq!(status.code(), Code::ResourceExhausted);
        let info = status.get_details_error_info().unwrap();
        assert_eq!(info.reason, "SUBSCRIBER_TOO_SLOW");
        assert_eq!(info.metadata["waited_ms"], "1500");
        let full = too_many_subscriptions(3);
        assert_eq!(full.code(), Code::ResourceExhausted);
        assert_eq!(
            full.get_details_error_info().unwrap().reason,
            "TOO_MANY_SUBSCRIPTIONS"
        );
    }

    #[test]
    fn a_reused_request_id_is_the_callers_mistake() {
        let status = Status::from(StoreError::RequestIdReused {
            request_id: crate::store::RequestId(uuid::Uuid::nil()),
            first_stream: "file-a".into(),
        });
        assert_eq!(status.code(), Code::InvalidArgument);
        assert_eq!(
            status.get_details_bad_request().unwrap().field_violations[0].field,
            "request_id"
        );
    }
}

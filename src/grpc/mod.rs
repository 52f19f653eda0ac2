//! The kernel's gRPC side: the read API, admin and read-model services, what every
//! application's services share (request helpers, the one status mapping),
//! and serving.
//!
//! Every server also carries health (`grpc.health.v1`, following its
//! dependencies), reflection v1 and v1alpha, request limits and a graceful
//! shutdown; see [`server`].

mod admin_service;
pub mod auth;
pub mod command_request;
mod health;
mod idle;
pub mod metrics;
pub mod page;
pub mod query_request;
mod read_model_service;
mod read_service;
mod remote_log;
mod request_span;
pub mod server;
mod status;
pub mod tls;
mod wire_status;

pub use self::admin_service::AdminApi;
pub use self::health::{Health, check as check_health};
pub use self::read_model_service::ReadModelApi;
pub use self::read_service::{MAX_PAGE, ReadApi, ReadConfig};
pub use self::remote_log::{Credentials, RemoteLog};
pub use self::status::{ERROR_DOMAIN, Violations};

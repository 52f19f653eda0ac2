//! # scaleout
//!
//! The kernel of a gRPC command/query platform: commands are decided by
//! event-sourced aggregates and appended to an event store with
//! expected-version checks; an outbox relay publishes the events to a bus;
//! projectors fold them into read models with CAS; queries read those,
//! waiting for a version when asked.
//!
//! The kernel names no domain. An application (see `crates/reference` and
//! `crates/example-bank`) defines its aggregates, projections and gRPC
//! services in its own crate and hands them over as one
//! [`app::Application`]; the services in [`app`] run any application.
//! Modules depend downward only:
//!
//! | module | owns | must not depend on |
//! | --- | --- | --- |
//! | [`pb`] | the kernel's generated Protobuf contract: envelope, read API, admin, what commands share | anything |
//! | [`config`], [`telemetry`], [`shutdown`], [`backoff`], [`error`], [`contention`], [`tls`] | typed flags, logs, the shutdown token, the one pause policy, the cause every failure keeps, the streams and documents that lose the most races, what TLS clients and servers share | the rest |
//! | [`domain`] | what an application's aggregates are: pure `decide` / `apply`, events, known types, validated values, given/when/then | I/O, `store`, `grpc` |
//! | [`store`] | the event store port, its shared batch planner, redb and PostgreSQL | `domain`, `command`, `grpc` |
//! | [`envelope`] | recorded events to and from their wire envelope | `domain`, `grpc` |
//! | [`bus`] | the event bus port, in-process and RabbitMQ | `store` internals, `domain`, `grpc` |
//! | [`documents`] | the read-model store port (CAS), redb and Couchbase | `domain`, `grpc` |
//! | [`log`] | reading the whole log: the port the read side reads through, a follower | `grpc`, `bus`, `documents` |
//! | [`command`] | load, decide, append: the commands queued on a stream decided in turn and committed as one chain; retry only what is safe | `grpc`, `bus` |
//! | [`relay`] | the outbox relay: store outbox → bus, with confirms | `domain`, `grpc` |
//! | [`projection`] | read models as a fold of the log: the projection contract, CAS writes, the runtime, generations, rebuild and verify | `store`, `grpc` |
//! | [`query`] | reading read models, waiting for a version when asked | `bus`, `store` |
//! | [`grpc`] | the read API, admin and read-model services, request helpers for applications' services, the one status mapping, health, reflection, serving | backends' internals |
//! | [`app`] | the application contract; the wiring of each deployable service and of the embedded platform | — |

pub mod app;
pub mod backoff;
pub mod bus;
pub mod command;
pub mod config;
pub mod contention;
pub mod documents;
pub mod domain;
pub mod envelope;
pub mod error;
mod group_commit;
pub mod grpc;
pub mod log;
pub mod pb;
pub mod projection;
pub mod query;
pub mod relay;
pub mod shutdown;
pub mod store;
pub mod telemetry;
pub mod tls;

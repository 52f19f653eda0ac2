//! # scaleout
//!
//! The kernel of a gRPC command/query platform: commands are decided by
//! event-sourced aggregates and appended to an event store with
//! expected-version checks. Modules depend downward only:
//!
//! | module | owns | must not depend on |
//! | --- | --- | --- |
//! | [`pb`] | the generated Protobuf contract of `proto/` | anything |
//! | [`domain`] | aggregates: pure `decide` / `apply`, validated values | I/O, `store`, `grpc` |
//! | [`store`] | the event store port, its shared batch logic, redb and PostgreSQL | `domain`, `command`, `grpc` |
//! | [`envelope`] | recorded events to and from their wire envelope | `domain`, `grpc` |
//! | [`command`] | load, decide, append; retry only what is safe | `grpc` |
//! | [`grpc`] | adapters, status mapping, health, reflection, serving | backends' internals |
//! | [`app`] | the wiring of each deployable service | — |
//! | [`config`], [`telemetry`], [`shutdown`] | flags, logs, the shutdown token | the rest |

pub mod app;
pub mod bus;
pub mod command;
pub mod config;
pub mod documents;
pub mod domain;
pub mod envelope;
pub mod grpc;
pub mod pb;
pub mod projection;
pub mod query;
pub mod relay;
pub mod shutdown;
pub mod store;
pub mod telemetry;

//! The reference application's gRPC services: decode, call the kernel, map
//! the error with the kernel's one status mapping.

mod command_service;
mod query_service;

pub use self::command_service::CommandApi;
pub use self::query_service::QueryApi;

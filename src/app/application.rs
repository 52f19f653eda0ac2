//! What an application plugs into the kernel.

use std::sync::Arc;
use std::time::Duration;

use crate::command::CommandHandler;
use crate::domain::KnownTypes;
use crate::grpc::server::Services;
use crate::projection::AnyProjection;
use crate::query::Queries;

/// An application built on the kernel: its aggregates, its read models and
/// the gRPC services it serves. The kernel's services (command-svc,
/// projector, query-svc, the embedded platform) run any application; none
/// of them names one.
pub trait Application: std::fmt::Debug + Send + Sync + 'static {
    /// The stream and event types its aggregates store (see
    /// [`KnownTypes::with`]).
    fn known_types(&self) -> KnownTypes;

    /// Every read model it keeps.
    fn projections(&self) -> Vec<Box<dyn AnyProjection>>;

    /// The encoded Protobuf `FileDescriptorSet` of its services and events,
    /// served by reflection beside the kernel's.
    fn file_descriptor_set(&self) -> &'static [u8];

    /// Adds its command services, deciding through `handler`.
    fn command_services(&self, handler: Arc<CommandHandler>, services: &mut Services);

    /// Adds its query services, reading through `queries` and waiting at
    /// most `max_wait` for a version.
    fn query_services(&self, queries: Queries, max_wait: Duration, services: &mut Services);
}

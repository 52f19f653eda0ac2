//! # The reference application
//!
//! Files in folders with comments, and counters, built on the scaleout
//! kernel the way any application is: its aggregates ([`domain`]), its read
//! models ([`views`]), its queries ([`queries`]) and its gRPC services,
//! registered with the kernel as one [`Reference`] [`Application`]. The
//! kernel's services and the embedded platform (`scaleout` binary) run it.
//!
//! | module | owns |
//! | --- | --- |
//! | [`pb`] | its Protobuf contract (events, `CommandService`, `QueryService`), beside the kernel's |
//! | [`domain`] | the file and counter aggregates, validated values |
//! | [`views`] | the file view, folder listing, comment thread and counter read models |
//! | [`queries`] | reading those, waiting for a version when asked |

pub mod domain;
mod grpc;
pub mod pb;
pub mod queries;
pub mod views;

use std::sync::Arc;
use std::time::Duration;

use scaleout::app::{Application, Services};
use scaleout::command::CommandHandler;
use scaleout::domain::KnownTypes;
use scaleout::projection::AnyProjection;
use scaleout::query::Queries;

pub use self::grpc::{CommandApi, QueryApi};
use self::queries::ReferenceQueries;

/// The reference application, as the kernel runs it.
#[derive(Debug, Clone, Copy, Default)]
pub struct Reference;

impl Application for Reference {
    fn known_types(&self) -> KnownTypes {
        KnownTypes::default()
            .with::<domain::File>()
            .with::<domain::Counter>()
    }

    fn projections(&self) -> Vec<Box<dyn AnyProjection>> {
        views::all()
    }

    fn file_descriptor_set(&self) -> &'static [u8] {
        pb::FILE_DESCRIPTOR_SET
    }

    fn command_services(&self, handler: Arc<CommandHandler>, services: &mut Services) {
        let limit = services.max_message_bytes;
        services.add(CommandApi::new(handler).into_service(limit));
    }

    fn query_services(&self, queries: Queries, max_wait: Duration, services: &mut Services) {
        let limit = services.max_message_bytes;
        services.add(QueryApi::new(ReferenceQueries(queries), max_wait).into_service(limit));
    }
}

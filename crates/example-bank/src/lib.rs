//! # A bank on the scaleout kernel
//!
//! The smallest whole application: one aggregate ([`account`]), one read
//! model ([`balance`]), a command and a query service ([`service`]), and
//! how events its first release stored read today ([`history`]), all in
//! this crate, registered with the kernel as the [`Bank`] [`Application`].
//! Nothing in the kernel names it, which is what it is here to prove.
//!
//! ```no_run
//! # async fn run() -> Result<(), Box<dyn std::error::Error>> {
//! let listener = tokio::net::TcpListener::bind("127.0.0.1:50051").await?;
//! let platform = scaleout::app::Platform {
//!     app: std::sync::Arc::new(bank::Bank),
//!     data_dir: "data".into(),
//!     server: Default::default(),
//!     retry: Default::default(),
//!     snapshot_every: scaleout::command::DEFAULT_SNAPSHOT_EVERY,
//!     max_wait: std::time::Duration::from_secs(5),
//! };
//! scaleout::app::run_platform(listener, platform, scaleout::shutdown::on_signal()).await?;
//! # Ok(())
//! # }
//! ```

pub mod account;
pub mod balance;
pub mod history;
pub mod pb;
pub mod service;

use std::sync::Arc;
use std::time::Duration;

use scaleout::app::{Application, Services};
use scaleout::command::CommandHandler;
use scaleout::domain::KnownTypes;
use scaleout::projection::AnyProjection;
use scaleout::query::Queries;

/// The bank, as the kernel runs it.
#[derive(Debug, Clone, Copy, Default)]
pub struct Bank;

impl Application for Bank {
    fn known_types(&self) -> KnownTypes {
        history::upcast(KnownTypes::default().with::<account::Account>())
    }

    fn projections(&self) -> Vec<Box<dyn AnyProjection>> {
        vec![Box::new(balance::BalanceProjection)]
    }

    fn file_descriptor_set(&self) -> &'static [u8] {
        pb::FILE_DESCRIPTOR_SET
    }

    fn command_services(&self, handler: Arc<CommandHandler>, services: &mut Services) {
        let limit = services.max_message_bytes;
        services.add(
            pb::bank_service_server::BankServiceServer::new(service::BankApi::new(handler))
                .max_decoding_message_size(limit),
        );
    }

    fn query_services(&self, queries: Queries, max_wait: Duration, services: &mut Services) {
        let limit = services.max_message_bytes;
        services.add(
            pb::bank_query_service_server::BankQueryServiceServer::new(service::BankQueryApi::new(
                queries, max_wait,
            ))
            .max_decoding_message_size(limit),
        );
    }
}

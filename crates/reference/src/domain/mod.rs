//! The reference domain: files in folders, with comments, and counters.
//! Pure `decide` and `apply` on the kernel's [`Aggregate`](scaleout::domain::Aggregate).

mod counter;
mod file;
pub mod values;

pub use self::counter::{Counter, CounterCommand, CounterEvent};
pub use self::file::{File, FileCommand, FileEvent};

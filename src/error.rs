//! What every failure of the kernel keeps: its cause.

use std::sync::Arc;

/// What a failure came from (a driver's or a file's error), kept as the
/// error's `source()` so that callers can inspect and downcast it; shared,
/// so that one failed batch can answer every append in it.
#[derive(Debug, Clone)]
pub struct Cause(Arc<dyn std::error::Error + Send + Sync>);

/// Derefs to the error itself (and is not an error of its own), so that
/// `source()` yields the driver's error, not a wrapper around it.
impl std::ops::Deref for Cause {
    type Target = dyn std::error::Error + Send + Sync + 'static;

    fn deref(&self) -> &Self::Target {
        &*self.0
    }
}

impl Cause {
    pub fn new(error: impl std::error::Error + Send + Sync + 'static) -> Self {
        Self(Arc::new(error))
    }
}

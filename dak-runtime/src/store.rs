//! The error every store returns, whatever its engine.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("redis: {0}")]
    Redis(::redis::RedisError),
    #[error("sqlite: {0}")]
    Sqlite(rusqlite::Error),
    /// The transaction a call was part of did not commit; with group commit
    /// every call of that transaction gets the same error.
    #[error("sqlite transaction: {0}")]
    Transaction(String),
    /// The thread that owns the store's connection is gone.
    #[error("store closed")]
    Closed,
    #[error("stored record is corrupt: {0}")]
    Corrupt(String),
}

crate::from_cause!(
    ::redis::RedisError => StoreError::Redis,
    rusqlite::Error => StoreError::Sqlite,
);

pub type StoreResult<T> = Result<T, StoreError>;

/// Resolves once writes a store answered for early are durable (see
/// [`crate::sqlite::Writer::call_early`]), or with the error that lost them.
#[must_use = "the writes are not known to be durable until this resolves"]
pub struct Durable(Pin<Box<dyn Future<Output = StoreResult<()>> + Send>>);

impl Durable {
    /// Writes that were durable when they were answered.
    pub fn already() -> Self {
        Self::new(std::future::ready(Ok(())))
    }

    pub fn new(durable: impl Future<Output = StoreResult<()>> + Send + 'static) -> Self {
        Self(Box::pin(durable))
    }

    /// Durable once every one of `all` is.
    pub fn all(all: Vec<Durable>) -> Self {
        Self::new(async move {
            for durable in all {
                durable.await?;
            }
            Ok(())
        })
    }
}

impl Future for Durable {
    type Output = StoreResult<()>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        self.0.as_mut().poll(cx)
    }
}

//! What a store found when it opened, and a queued write's answer.

use tokio::sync::oneshot;

use crate::error::StoreError;

/// What a store found in the database when it opened before it started.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StartupInfo {
    /// The database file did not exist (or was empty) and was created.
    pub created: bool,
    /// The previous process that opened this database closed it with
    /// [`SessionStore::close`](crate::SessionStore::close). When false, crash recovery should run.
    pub previous_clean_shutdown: bool,
    /// The schema version found before migrating (0 for a new file).
    pub migrated_from: u32,
    /// The schema version now in the file.
    pub schema_version: u32,
    /// A random id fixed when the database was created.
    pub instance_id: String,
    /// How many times the database has been opened, this open included (1 for
    /// a new file): tells one run of a service from the next.
    pub run: u64,
}

/// A write in the writer's queue; resolves to its result once the
/// transaction holding it has committed (or failed).
#[derive(Debug)]
#[must_use = "a queued write is answered through this future"]
pub struct Committing<T, E = StoreError> {
    rx: oneshot::Receiver<Result<T, E>>,
}

impl<T, E> Committing<T, E> {
    /// A queued write answered through `rx` (for other [`SessionStore`]
    /// backends: the sender is dropped unanswered when the store stops,
    /// which resolves the future to [`StoreError::Closed`]).
    ///
    /// [`SessionStore`]: crate::SessionStore
    pub fn new(rx: oneshot::Receiver<Result<T, E>>) -> Self {
        Committing { rx }
    }
}

impl<T, E: From<StoreError>> std::future::Future for Committing<T, E> {
    type Output = Result<T, E>;

    fn poll(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Self::Output> {
        std::pin::Pin::new(&mut self.rx)
            .poll(cx)
            .map(|r| r.unwrap_or_else(|_| Err(E::from(StoreError::Closed))))
    }
}

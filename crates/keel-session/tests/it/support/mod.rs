//! Shared helpers: a store in a fresh temp directory, with a controllable clock.

use std::path::PathBuf;
use std::sync::Arc;

use keel_session::{Config, ManualClock, Store};
use tempfile::TempDir;

/// A store in its own temp directory; the directory lives as long as this.
pub(crate) struct TestStore {
    pub(crate) store: Store,
    pub(crate) clock: Arc<ManualClock>,
    pub(crate) dir: TempDir,
}

impl TestStore {
    pub(crate) fn path(&self) -> PathBuf {
        self.dir.path().join("keel.db")
    }

    pub(crate) fn config(&self) -> Config {
        Config {
            clock: self.clock.clone(),
            ..self.store.config().clone()
        }
    }

    /// Closes the store cleanly and opens it again on the same file.
    pub(crate) async fn reopen(&mut self) {
        self.store.close().await.expect("close");
        self.store = Store::open(&self.path(), self.config())
            .await
            .expect("reopen");
    }
}

pub(crate) const T0: i64 = 1_700_000_000_000;

pub(crate) async fn open() -> TestStore {
    open_with(Config::default()).await
}

pub(crate) async fn open_with(config: Config) -> TestStore {
    let dir = tempfile::tempdir().expect("tempdir");
    let clock = Arc::new(ManualClock::new(T0));
    let config = Config {
        clock: clock.clone(),
        ..config
    };
    let store = Store::open(&dir.path().join("keel.db"), config)
        .await
        .expect("open store");
    TestStore { store, clock, dir }
}

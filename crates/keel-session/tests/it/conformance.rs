//! The store conformance suite (keel-store's `testkit`, re-exported as
//! `keel_session::testkit`) on the SQLite store, directly and through
//! keel-store's `Either`.

use std::sync::Arc;

use keel_session::testkit::{ACTIVITY_LIMIT, Harness, T0};
use keel_session::{Config, ManualClock, Store};
use tempfile::TempDir;

struct Sqlite {
    store: Store,
    clock: Arc<ManualClock>,
    dir: TempDir,
}

impl Sqlite {
    fn config(&self) -> Config {
        Config {
            clock: self.clock.clone(),
            activity_limit: ACTIVITY_LIMIT,
            ..Config::default()
        }
    }
}

impl Harness for Sqlite {
    type Store = Store;

    fn store(&self) -> &Store {
        &self.store
    }

    fn clock(&self) -> &ManualClock {
        &self.clock
    }

    async fn reopen(&mut self, clean: bool) {
        if clean {
            self.store.close().await.expect("close");
        } else {
            self.store.close_unclean().await.expect("close unclean");
        }
        let path = self.dir.path().join("keel.db");
        self.store = Store::open(&path, self.config()).await.expect("reopen");
    }
}

async fn open() -> Option<Sqlite> {
    let dir = tempfile::tempdir().expect("tempdir");
    let clock = Arc::new(ManualClock::new(T0));
    let config = Config {
        clock: clock.clone(),
        activity_limit: ACTIVITY_LIMIT,
        ..Config::default()
    };
    let store = Store::open(&dir.path().join("keel.db"), config)
        .await
        .expect("open store");
    Some(Sqlite { store, clock, dir })
}

keel_session::conformance_suite!(open);

/// The same suite through keel-store's [`Either`](keel_session::Either), the
/// store type keel-relay runs on, with the SQLite store on its right: every
/// method, those with a default body included, must reach the backend
/// unchanged.
mod through_either {
    use keel_session::testkit::Harness;
    use keel_session::{Either, ManualClock, Store};

    pub(super) struct Through {
        inner: super::Sqlite,
        store: Either<Store, Store>,
    }

    impl Harness for Through {
        type Store = Either<Store, Store>;

        fn store(&self) -> &Self::Store {
            &self.store
        }

        fn clock(&self) -> &ManualClock {
            self.inner.clock()
        }

        async fn reopen(&mut self, clean: bool) {
            self.inner.reopen(clean).await;
            self.store = Either::Right(self.inner.store.clone());
        }
    }

    async fn open() -> Option<Through> {
        let inner = super::open().await?;
        let store = Either::Right(inner.store.clone());
        Some(Through { inner, store })
    }

    keel_session::conformance_suite!(open);
}

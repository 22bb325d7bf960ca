//! The store conformance suite (`keel_store::testkit`) on PostgreSQL: one
//! fresh database per test, dropped after it.

use std::sync::Arc;

use keel_session_pg::testing::TestDatabase;
use keel_session_pg::{PgConfig, PgStore};
use keel_store::testkit::{ACTIVITY_LIMIT, Harness, T0};
use keel_store::{ManualClock, SessionStore};

struct Pg {
    store: PgStore,
    clock: Arc<ManualClock>,
    // Declared last: the database is dropped after the store.
    _db: TestDatabase,
}

fn config(url: &str, clock: &Arc<ManualClock>) -> PgConfig {
    PgConfig {
        url: url.to_owned(),
        node_id: "node-a".into(),
        pool_size: 8,
        activity_limit: ACTIVITY_LIMIT,
        clock: Some(clock.clone()),
        ..PgConfig::default()
    }
}

impl Harness for Pg {
    type Store = PgStore;

    fn store(&self) -> &PgStore {
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
        let config = config(&self.store.config().url, &self.clock);
        self.store = PgStore::open(config).await.expect("reopen");
    }
}

async fn open() -> Option<Pg> {
    let db = TestDatabase::create().await?;
    let clock = Arc::new(ManualClock::new(T0));
    let store = PgStore::open(config(&db.url, &clock))
        .await
        .expect("open the PostgreSQL store");
    Some(Pg {
        store,
        clock,
        _db: db,
    })
}

keel_store::conformance_suite!(
    #[ignore = "needs PostgreSQL on 127.0.0.1: cargo test -- --include-ignored"]
    open
);

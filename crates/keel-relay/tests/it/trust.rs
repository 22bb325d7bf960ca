//! Trust boundaries: what a local user or a client may not reach.

use std::os::unix::fs::PermissionsExt;

use nix::sys::stat::{Mode, umask};
use serde_json::json;

use crate::support::*;

fn mode(p: &std::path::Path) -> u32 {
    std::fs::metadata(p).unwrap().permissions().mode() & 0o777
}

/// A relay started under a permissive umask keeps its data directory
/// (0700), database, WAL, shared-memory file and lock (0600) to its owner:
/// the database holds private channels and exec output.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn data_dir_permissions() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let old = umask(Mode::empty());
    let relay = RelayProcess::start(&data, Opts::default()).await;
    umask(old);
    let c = client(&relay.url()).await;
    c.publish("room", "m1", &json!("private")).await.unwrap();
    assert_eq!(mode(&data), 0o700, "data directory");
    for name in ["keel.db", "keel.db-wal", "keel.db-shm", "keel.lock"] {
        assert_eq!(mode(&data.join(name)), 0o600, "{name}");
    }
}

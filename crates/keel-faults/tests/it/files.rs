//! Disk and file faults on real files.

use keel_faults::corrupt;
use keel_faults::disk::{self, Tmpfs, TmpfsMount};

fn sqlite_with_rows(path: &std::path::Path) {
    let conn = rusqlite::Connection::open(path).unwrap();
    conn.execute_batch("CREATE TABLE t(id INTEGER PRIMARY KEY, v TEXT); CREATE INDEX t_v ON t(v);")
        .unwrap();
    let tx = conn.unchecked_transaction().unwrap();
    for i in 0..5_000 {
        tx.execute("INSERT INTO t(v) VALUES(?1)", [format!("value-{i:08}")])
            .unwrap();
    }
    tx.commit().unwrap();
}

fn quick_check(path: &std::path::Path) -> Result<String, String> {
    let conn = rusqlite::Connection::open(path).map_err(|e| e.to_string())?;
    conn.query_row("PRAGMA quick_check", [], |r| r.get::<_, String>(0))
        .map_err(|e| e.to_string())
}

#[test]
fn corruption_makes_sqlite_fail_quick_check() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("a.db");
    sqlite_with_rows(&db);
    assert_eq!(quick_check(&db).as_deref(), Ok("ok"));
    // Garbage over pages 2..6 (the header page is left alone, so the file still opens).
    corrupt::overwrite(&db, &[4096..8192, 8192..4096 * 6], 11).unwrap();
    let after = quick_check(&db);
    assert_ne!(
        after.as_deref(),
        Ok("ok"),
        "quick_check must notice: {after:?}"
    );
}

#[test]
fn corruption_is_seeded() {
    let dir = tempfile::tempdir().unwrap();
    let (a, b) = (dir.path().join("a"), dir.path().join("b"));
    std::fs::write(&a, vec![0u8; 10_000]).unwrap();
    std::fs::write(&b, vec![0u8; 10_000]).unwrap();
    let ra = corrupt::overwrite_random(&a, 4, 100, 99).unwrap();
    let rb = corrupt::overwrite_random(&b, 4, 100, 99).unwrap();
    assert_eq!(ra, rb);
    assert_eq!(std::fs::read(&a).unwrap(), std::fs::read(&b).unwrap());
    assert_eq!(
        corrupt::flip_bits(&a, 10, 3).unwrap(),
        corrupt::flip_bits(&b, 10, 3).unwrap()
    );
    assert_eq!(std::fs::read(&a).unwrap(), std::fs::read(&b).unwrap());
    corrupt::truncate(&a, 123).unwrap();
    assert_eq!(std::fs::metadata(&a).unwrap().len(), 123);
}

#[test]
fn a_writer_on_a_small_tmpfs_gets_enospc() {
    let dir = tempfile::tempdir().unwrap();
    let mount_point = dir.path().join("data");
    let fs = match Tmpfs::mount(&mount_point, 1 << 20) {
        TmpfsMount::Mounted(fs) => fs,
        TmpfsMount::Skipped { why } => {
            // Reported, not passed silently: the test output says why.
            println!("SKIPPED a_writer_on_a_small_tmpfs_gets_enospc: {why}");
            return;
        }
    };
    let written = disk::fill(&fs.path().join("fill"), None).unwrap();
    assert!(written <= 1 << 20 && written > 512 * 1024, "{written}");
    let err = std::fs::write(fs.path().join("more"), vec![1u8; 64 * 1024]).unwrap_err();
    assert_eq!(err.raw_os_error(), Some(nix::libc::ENOSPC), "{err}");
    std::fs::remove_file(fs.path().join("fill")).unwrap();
    std::fs::write(fs.path().join("more"), vec![1u8; 64 * 1024]).expect("space is back");
    fs.unmount().unwrap();
}

//! Planted bugs that prove the harness's checker catches what it claims to
//! (keel's rule, docs/report-format.md: "a checker is trusted only after it has caught a bug planted
//! on purpose"). Compiled only with the `failpoints` cargo feature, which is
//! off by default: the release binary `cargo xtask` builds never has it.
//! With the feature, nothing changes unless `KEEL_FAILPOINTS` names a
//! failpoint, e.g. `KEEL_FAILPOINTS=drop_delivery=50` (one live delivery in
//! 50 is not written). Failpoints: `drop_delivery`, `duplicate_delivery`,
//! `reorder_delivery` (swapped with the next live delivery of the same
//! batch), `corrupt_delivery` (written with its payload replaced), each
//! one in N; `reverse_batch` (one batch of pipelined publishes
//! in N is queued to the store in reverse, so its offsets run against the
//! send order); `hide_crash` (a CRASHED session's welcome says DETACHED:
//! the crash goes unreported); `slow_detach=N` (a closing connection waits
//! N ms between giving up its session and writing it DETACHED: widens a
//! race with a newer connection of the same session, for its test).

/// What the writer does with one live delivery.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
// Only `Write` is built without the feature; the writer matches on all.
#[cfg_attr(not(feature = "failpoints"), allow(dead_code))]
pub(crate) enum Delivery {
    /// Write it (always, without the feature).
    Write,
    /// Skip it, as if written.
    Drop,
    /// Write it twice.
    Duplicate,
    /// Write it after the next one.
    Reorder,
    /// Write it with another payload.
    Corrupt,
}

/// `frame` (a `deliver` frame, whose last field is its payload) with the
/// payload replaced, for the `corrupt_delivery` failpoint. The first
/// `"payload":` is the frame's own: the fields before it are escaped
/// strings and numbers, where the quotes of such a key cannot appear
/// unescaped; the payload itself may hold one.
#[cfg_attr(not(feature = "failpoints"), allow(dead_code))]
pub(crate) fn corrupted(frame: &str) -> String {
    match frame.find(r#""payload":"#) {
        Some(at) => format!(
            r#"{}"payload":"corrupted by the corrupt_delivery failpoint"}}"#,
            &frame[..at]
        ),
        None => frame.to_owned(),
    }
}

#[cfg(not(feature = "failpoints"))]
mod imp {
    #[inline(always)]
    pub(crate) fn delivery() -> super::Delivery {
        super::Delivery::Write
    }

    #[inline(always)]
    pub(crate) fn reverse_batch() -> bool {
        false
    }

    #[inline(always)]
    pub(crate) fn hide_crash() -> bool {
        false
    }

    #[inline(always)]
    pub(crate) fn detach_delay() -> Option<std::time::Duration> {
        None
    }
}

#[cfg(feature = "failpoints")]
mod imp {
    use std::sync::OnceLock;
    use std::sync::atomic::{AtomicU64, Ordering};

    use super::Delivery;

    #[derive(Default)]
    struct Points {
        drop: u64,
        duplicate: u64,
        reorder: u64,
        corrupt: u64,
        reverse: u64,
        hide_crash: u64,
        slow_detach: u64,
        deliveries: AtomicU64,
        batches: AtomicU64,
    }

    fn points() -> &'static Points {
        static POINTS: OnceLock<Points> = OnceLock::new();
        POINTS.get_or_init(|| {
            let mut p = Points::default();
            let spec = std::env::var("KEEL_FAILPOINTS").unwrap_or_default();
            for item in spec.split(',').filter(|s| !s.is_empty()) {
                let (name, n) = item.split_once('=').unwrap_or((item, "1"));
                let n: u64 = n.trim().parse().unwrap_or(0);
                match name.trim() {
                    "drop_delivery" => p.drop = n,
                    "duplicate_delivery" => p.duplicate = n,
                    "reorder_delivery" => p.reorder = n,
                    "corrupt_delivery" => p.corrupt = n,
                    "reverse_batch" => p.reverse = n,
                    "hide_crash" => p.hide_crash = n,
                    "slow_detach" => p.slow_detach = n,
                    other => tracing::error!(failpoint = other, "unknown failpoint ignored"),
                }
            }
            if !spec.is_empty() {
                tracing::warn!(%spec, "failpoints armed: this relay breaks its own guarantees on purpose");
            }
            p
        })
    }

    pub(crate) fn delivery() -> Delivery {
        let p = points();
        if p.drop == 0 && p.duplicate == 0 && p.reorder == 0 && p.corrupt == 0 {
            return Delivery::Write;
        }
        let n = p.deliveries.fetch_add(1, Ordering::Relaxed) + 1;
        let hit = |every: u64| every > 0 && n.is_multiple_of(every);
        if hit(p.drop) {
            Delivery::Drop
        } else if hit(p.duplicate) {
            Delivery::Duplicate
        } else if hit(p.reorder) {
            Delivery::Reorder
        } else if hit(p.corrupt) {
            Delivery::Corrupt
        } else {
            Delivery::Write
        }
    }

    pub(crate) fn reverse_batch() -> bool {
        let p = points();
        p.reverse > 0 && (p.batches.fetch_add(1, Ordering::Relaxed) + 1).is_multiple_of(p.reverse)
    }

    pub(crate) fn hide_crash() -> bool {
        points().hide_crash > 0
    }

    pub(crate) fn detach_delay() -> Option<std::time::Duration> {
        let ms = points().slow_detach;
        (ms > 0).then(|| std::time::Duration::from_millis(ms))
    }
}

pub(crate) use imp::{delivery, detach_delay, hide_crash, reverse_batch};

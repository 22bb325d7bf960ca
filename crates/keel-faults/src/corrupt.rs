//! File corruption: seeded garbage over byte ranges, truncation, bit flips.

use std::fs::OpenOptions;
use std::io::{Read, Seek, SeekFrom, Write};
use std::ops::Range;
use std::path::Path;

use rand::rngs::StdRng;
use rand::{Rng, RngCore, SeedableRng};

/// What a corruption changed, for the report.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Corrupted {
    /// The byte ranges changed.
    pub ranges: Vec<Range<u64>>,
}

/// Overwrites each range of `path` with garbage from an RNG seeded with `seed`.
/// Ranges past the end are clipped.
pub fn overwrite(path: &Path, ranges: &[Range<u64>], seed: u64) -> std::io::Result<Corrupted> {
    let mut file = OpenOptions::new().read(true).write(true).open(path)?;
    let len = file.metadata()?.len();
    let mut rng = StdRng::seed_from_u64(seed);
    let mut changed = Vec::new();
    for range in ranges {
        let r = range.start.min(len)..range.end.min(len);
        if r.is_empty() {
            continue;
        }
        let mut garbage = vec![0u8; (r.end - r.start) as usize];
        rng.fill_bytes(&mut garbage);
        file.seek(SeekFrom::Start(r.start))?;
        file.write_all(&garbage)?;
        changed.push(r);
    }
    file.sync_all()?;
    Ok(Corrupted { ranges: changed })
}

/// Overwrites `count` seeded-random ranges of `len` bytes each.
pub fn overwrite_random(
    path: &Path,
    count: usize,
    len: u64,
    seed: u64,
) -> std::io::Result<Corrupted> {
    let size = std::fs::metadata(path)?.len();
    let mut rng = StdRng::seed_from_u64(seed ^ 0x9e37_79b9);
    let ranges: Vec<Range<u64>> = (0..count)
        .map(|_| {
            let start = rng.random_range(0..size.max(1));
            start..start + len
        })
        .collect();
    overwrite(path, &ranges, seed)
}

/// Truncates `path` to `len` bytes.
pub fn truncate(path: &Path, len: u64) -> std::io::Result<()> {
    OpenOptions::new().write(true).open(path)?.set_len(len)
}

/// Flips `count` seeded-random bits; returns the byte offsets touched.
pub fn flip_bits(path: &Path, count: usize, seed: u64) -> std::io::Result<Vec<u64>> {
    let mut file = OpenOptions::new().read(true).write(true).open(path)?;
    let size = file.metadata()?.len();
    if size == 0 {
        return Ok(Vec::new());
    }
    let mut rng = StdRng::seed_from_u64(seed);
    let mut offsets = Vec::with_capacity(count);
    for _ in 0..count {
        let offset = rng.random_range(0..size);
        let bit = rng.random_range(0..8u8);
        let mut byte = [0u8; 1];
        file.seek(SeekFrom::Start(offset))?;
        file.read_exact(&mut byte)?;
        byte[0] ^= 1 << bit;
        file.seek(SeekFrom::Start(offset))?;
        file.write_all(&byte)?;
        offsets.push(offset);
    }
    file.sync_all()?;
    Ok(offsets)
}

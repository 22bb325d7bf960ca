//! Shared support for keel's cross-crate load and chaos tests.
//!
//! The scenarios themselves arrive with `keel-harness`; until then the two test
//! binaries (`load`, `chaos`) hold no tests rather than placeholder ones.

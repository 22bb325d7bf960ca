//! keel-ratelimit integration tests, all on paused tokio time.

mod backoff;
mod fairness;
mod limits;
mod overflow;
mod property;
mod support;

//! keel-recovery against real processes, real signals and real files.

mod health;
mod roles;
mod startup;
mod supervise;
mod support;

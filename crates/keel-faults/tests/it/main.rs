//! keel-faults integration tests: real sockets on 127.0.0.1, real processes, real files.

mod api;
mod files;
mod processes;
mod proxy;
mod support;
mod upstream;
mod ws;

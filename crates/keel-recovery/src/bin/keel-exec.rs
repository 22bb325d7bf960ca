//! `keel-exec PARENT_PID PROGRAM [ARGS...]`: runs PROGRAM so that it is
//! SIGKILLed when its parent dies. Used by keel-recovery's supervisor.

fn main() {
    std::process::exit(keel_recovery::supervise::exec_helper_main(
        std::env::args_os().skip(1),
    ));
}

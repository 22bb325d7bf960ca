//! The relay's frame decoder on arbitrary input: it must never panic, and
//! whatever it accepts must be within the limit it was given.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(text) = std::str::from_utf8(data) {
        if keel_relay::protocol::decode(text, 4096).is_ok() {
            assert!(text.len() <= 4096);
        }
    }
});

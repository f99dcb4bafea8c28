//! Any bytes as a config file: a diagnostic or a config, never a panic, in bounded time.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| switchyard::fuzzing::config_loader(data));

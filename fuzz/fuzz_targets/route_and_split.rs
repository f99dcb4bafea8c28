//! Any request facts: admission, route match and split never panic; a match holds.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| switchyard::fuzzing::route_and_split(data));

//! Any client byte stream, cut into reads at 0xFF: the same verdict however it is cut.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| switchyard::fuzzing::head_guard(data));

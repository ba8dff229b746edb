#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| fuzz_targets::pdu_stream(data));

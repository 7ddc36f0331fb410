#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| weft_fuzz::control_message::run(data));

#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| vpcgated::fuzzing::dns(data));

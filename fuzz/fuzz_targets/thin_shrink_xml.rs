#![no_main]
// Harness: thinmeta::fuzzing::thin_shrink_xml (src/fuzzing.rs), shared with tests/fuzz_regressions.rs.
libfuzzer_sys::fuzz_target!(|data: &[u8]| thinmeta::fuzzing::thin_shrink_xml(data));

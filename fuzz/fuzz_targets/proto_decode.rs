#![no_main]
//! The wire decoder on arbitrary bytes, both directions.
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = serde_json::from_slice::<proto::Request>(data);
    let _ = serde_json::from_slice::<proto::Response>(data);
});

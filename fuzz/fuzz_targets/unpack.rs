#![no_main]
//! The unpacker on arbitrary bytes: must return (refused or unpacked) without a panic
//! and write nothing outside its destination.
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let tmp = tempfile::tempdir().unwrap();
    let dest = tmp.path().join("dest");
    std::fs::create_dir(&dest).unwrap();
    let limits = agent::release::unpack::Limits {
        max_total_bytes: 64 * 1024 * 1024,
        ..Default::default()
    };
    let _ = agent::release::unpack::unpack_tar_gz(data, &dest, &limits);
    let outside: Vec<_> = std::fs::read_dir(tmp.path()).unwrap().collect();
    assert_eq!(outside.len(), 1, "something was written outside dest");
});

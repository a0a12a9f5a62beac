//! Stable fuzz runner for the unpacker: replays the committed corpus
//! (`fuzz/corpus/unpack/`) and a bounded number of seeded mutations of it, both of the
//! gzip bytes and of the tar inside (re-compressed), into a sandbox. Each input must
//! return (refused or unpacked) without a panic, write nothing outside its destination,
//! and the whole run must stay under a memory bound. `FUZZ_ITERS` and `FUZZ_SEED` make
//! longer or other runs; `fuzz/` has the libFuzzer target for nightly.

#[path = "../../fuzz/src/mutate.rs"]
mod mutate;

use std::io::{Read, Write};
use std::path::Path;
use std::time::{Duration, Instant};

use agent::release::unpack::{Limits, unpack_tar_gz};

fn corpus() -> Vec<(String, Vec<u8>)> {
    mutate::load_corpus(&Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz/corpus/unpack"))
}

fn gunzip(data: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    let _ = flate2::read::GzDecoder::new(data).read_to_end(&mut out);
    out
}

fn gzip(data: &[u8]) -> Vec<u8> {
    let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    e.write_all(data).unwrap();
    e.finish().unwrap()
}

/// Unpacks `input` into a fresh sandbox; panics (after saving the input) on a panic in
/// the unpacker, a hang, or anything written outside the destination.
fn run_one(input: &[u8]) {
    let tmp = tempfile::tempdir().unwrap();
    let dest = tmp.path().join("dest");
    std::fs::create_dir(&dest).unwrap();
    std::fs::write(tmp.path().join("sentinel"), b"s").unwrap();
    let limits = Limits {
        max_total_bytes: 64 * 1024 * 1024,
        ..Limits::default()
    };
    let started = Instant::now();
    let result = std::panic::catch_unwind(|| {
        let _ = unpack_tar_gz(input, &dest, &limits);
    });
    let took = started.elapsed();
    let mut names: Vec<String> = std::fs::read_dir(tmp.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    names.sort();
    let contained = names == ["dest", "sentinel"]
        && std::fs::read(tmp.path().join("sentinel")).unwrap() == b"s";
    // A generous bound that only a hang or a blow-up reaches, not a slow machine.
    if result.is_err() || !contained || took > Duration::from_secs(30) {
        let saved = mutate::save_failure("unpack", input);
        panic!(
            "unpack input saved at {}: panicked={} contained={contained} took={took:?}",
            saved.display(),
            result.is_err()
        );
    }
}

// See: #16 (fuzzing)
#[test]
fn unpacker_survives_corpus_and_seeded_mutations() {
    let corpus = corpus();
    let raw: Vec<Vec<u8>> = corpus.iter().map(|(_, d)| d.clone()).collect();
    let tars: Vec<Vec<u8>> = raw.iter().map(|d| gunzip(d)).collect();
    for (name, data) in &corpus {
        eprintln!("replay {name}");
        run_one(data);
    }
    let mut rng = mutate::Rng::new(mutate::seed());
    let iters = mutate::iterations(400);
    for _ in 0..iters {
        let i = rng.below(raw.len());
        if rng.below(2) == 0 {
            run_one(&mutate::mutate(&mut rng, &raw[i], &raw, 1 << 20));
        } else {
            let tar = mutate::mutate(&mut rng, &tars[i], &tars, 1 << 20);
            run_one(&gzip(&tar));
        }
    }
    let rss = mutate::peak_rss_kib();
    eprintln!("{iters} mutations, peak RSS {rss} KiB");
    assert!(rss < 256 * 1024, "peak RSS {rss} KiB");
}

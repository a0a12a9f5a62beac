//! Seeded mutations of a committed corpus, shared by the stable in-suite runners
//! (`agent/tests/fuzz_unpack.rs`, `proto/tests/fuzz_decode.rs`,
//! `controller/tests/fuzz_config.rs`) and usable from the libFuzzer targets. No
//! dependencies: each runner includes this file with `#[path]`.

#![allow(dead_code)]

use std::path::Path;

/// xorshift64*: deterministic, so a failure is replayed by its seed.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }
    pub fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    pub fn below(&mut self, n: usize) -> usize {
        if n == 0 {
            0
        } else {
            (self.next() % n as u64) as usize
        }
    }
}

/// Values that tend to hit limits and parsers' edge cases.
const INTERESTING: &[&[u8]] = &[
    b"\0",
    b"\xff",
    b"/",
    b"..",
    b"../",
    b"./",
    b"\n",
    b"\"",
    b"{",
    b"}",
    b"[",
    b"]",
    b"=",
    b"${",
    b"77777777777",
    b"-1",
    b"18446744073709551616",
    b"\xc3\x28",
    b"././@LongLink",
];

/// One to four random edits of `input` (bit flips, byte sets, inserts, deletes, block
/// duplication, splices from another corpus entry, interesting tokens), at most
/// `max_len` bytes long.
pub fn mutate(rng: &mut Rng, input: &[u8], corpus: &[Vec<u8>], max_len: usize) -> Vec<u8> {
    let mut v = input.to_vec();
    for _ in 0..1 + rng.below(4) {
        let len = v.len();
        match rng.below(8) {
            0 if len > 0 => {
                let i = rng.below(len);
                v[i] ^= 1 << rng.below(8);
            }
            1 if len > 0 => {
                let i = rng.below(len);
                v[i] = rng.next() as u8;
            }
            2 => {
                let i = rng.below(len + 1);
                let n = 1 + rng.below(16);
                let bytes: Vec<u8> = (0..n).map(|_| rng.next() as u8).collect();
                v.splice(i..i, bytes);
            }
            3 if len > 0 => {
                let i = rng.below(len);
                let n = 1 + rng.below((len - i).min(64));
                v.drain(i..i + n);
            }
            4 if len > 0 => {
                let i = rng.below(len);
                let n = 1 + rng.below((len - i).min(512));
                let block = v[i..i + n].to_vec();
                let at = rng.below(len + 1);
                v.splice(at..at, block);
            }
            5 if !corpus.is_empty() => {
                let other = &corpus[rng.below(corpus.len())];
                if !other.is_empty() {
                    let a = rng.below(other.len());
                    let b = a + rng.below(other.len() - a + 1);
                    let at = rng.below(len + 1);
                    v.splice(at..at, other[a..b].iter().copied());
                }
            }
            6 => {
                let tok = INTERESTING[rng.below(INTERESTING.len())];
                let at = rng.below(len + 1);
                if rng.below(2) == 0 || len == 0 {
                    v.splice(at..at, tok.iter().copied());
                } else {
                    let end = (at + tok.len()).min(len);
                    v.splice(at..end, tok.iter().copied());
                }
            }
            _ if len > 0 => {
                // Truncate.
                v.truncate(rng.below(len));
            }
            _ => v.push(rng.next() as u8),
        }
    }
    v.truncate(max_len);
    v
}

/// Every file of a corpus directory, sorted by name.
pub fn load_corpus(dir: &Path) -> Vec<(String, Vec<u8>)> {
    let mut out: Vec<(String, Vec<u8>)> = std::fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("corpus {}: {e}", dir.display()))
        .map(|e| {
            let e = e.unwrap();
            (
                e.file_name().to_string_lossy().into_owned(),
                std::fs::read(e.path()).unwrap(),
            )
        })
        .collect();
    out.sort();
    assert!(!out.is_empty(), "corpus {} is empty", dir.display());
    out
}

/// How many mutations a runner does: `FUZZ_ITERS`, else `default`.
pub fn iterations(default: usize) -> usize {
    std::env::var("FUZZ_ITERS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// The seed: `FUZZ_SEED`, else a fixed one (the suite stays deterministic).
pub fn seed() -> u64 {
    std::env::var("FUZZ_SEED")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(16)
}

/// Peak resident memory of this process (`VmHWM`), in KiB.
pub fn peak_rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmHWM:"))
                .and_then(|v| v.split_whitespace().next()?.parse().ok())
        })
        .unwrap_or(0)
}

/// Saves an input that broke a runner, for replay, and returns its path.
pub fn save_failure(target: &str, input: &[u8]) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join("deployctl-fuzz-failures");
    let _ = std::fs::create_dir_all(&dir);
    let p = dir.join(format!("{target}-{:016x}", {
        let mut h: u64 = 0xcbf2_9ce4_8422_2325;
        for b in input {
            h = (h ^ *b as u64).wrapping_mul(0x100_0000_01b3);
        }
        h
    }));
    let _ = std::fs::write(&p, input);
    p
}

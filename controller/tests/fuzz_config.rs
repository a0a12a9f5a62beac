//! Stable fuzz runner for the `deploy.toml` parser: replays the committed corpus
//! (`fuzz/corpus/config/`) and seeded mutations of it through `Config::parse`. No input
//! may panic or hang; every error must have a message. `FUZZ_ITERS` / `FUZZ_SEED` for
//! longer runs.

#[path = "../../fuzz/src/mutate.rs"]
mod mutate;

use std::path::Path;
use std::time::{Duration, Instant};

use deployctl::config::Config;

fn corpus() -> Vec<(String, Vec<u8>)> {
    mutate::load_corpus(&Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz/corpus/config"))
}

fn parse(input: &[u8]) {
    let text = String::from_utf8_lossy(input);
    let started = Instant::now();
    let r = std::panic::catch_unwind(|| {
        let env = |k: &str| (k == "APP_DIR").then(|| "myapp".to_owned());
        match Config::parse(&text, "fuzz.toml", &env) {
            Ok(c) => {
                for name in c.environment_names() {
                    let _ = c.environment(&name);
                }
                true
            }
            Err(e) => !e.to_string().is_empty(),
        }
    });
    if !matches!(r, Ok(true)) || started.elapsed() > Duration::from_secs(20) {
        let p = mutate::save_failure("config", input);
        panic!(
            "config parser panicked, hung or gave an empty error; input saved at {}",
            p.display()
        );
    }
}

// See: #16 (fuzzing)
#[test]
fn config_parser_survives_corpus_and_seeded_mutations() {
    let corpus: Vec<Vec<u8>> = corpus().into_iter().map(|(_, d)| d).collect();
    for d in &corpus {
        parse(d);
    }
    let mut rng = mutate::Rng::new(mutate::seed());
    let iters = mutate::iterations(2000);
    for _ in 0..iters {
        let seed = &corpus[rng.below(corpus.len())];
        parse(&mutate::mutate(&mut rng, seed, &corpus, 64 * 1024));
    }
    let rss = mutate::peak_rss_kib();
    eprintln!("{iters} mutations, peak RSS {rss} KiB");
    assert!(rss < 256 * 1024, "peak RSS {rss} KiB");
}

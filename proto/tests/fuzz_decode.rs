//! Stable fuzz runner for the protocol decoder: replays the committed corpus
//! (`fuzz/corpus/proto/`) and seeded mutations of it through the JSON message decoder
//! (both directions) and through the WebSocket codec (raw bytes on a duplex stream, as
//! a hostile peer would send them). No input may panic or hang; the run stays under a
//! memory bound. `FUZZ_ITERS` / `FUZZ_SEED` for longer runs.

#[path = "../../fuzz/src/mutate.rs"]
mod mutate;

use std::path::Path;
use std::time::Duration;

use proto::{Request, Response};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

fn corpus() -> Vec<(String, Vec<u8>)> {
    mutate::load_corpus(&Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz/corpus/proto"))
}

fn decode(input: &[u8]) {
    let r = std::panic::catch_unwind(|| {
        let _ = serde_json::from_slice::<Request>(input);
        let _ = serde_json::from_slice::<Response>(input);
    });
    if r.is_err() {
        let p = mutate::save_failure("proto-json", input);
        panic!("decoder panicked; input saved at {}", p.display());
    }
}

/// A client WebSocket handshake followed by `frames` (raw bytes), read by the agent
/// side of the codec until it errors or the stream ends.
async fn codec_round(frames: Vec<u8>) -> usize {
    let (a, mut b) = tokio::io::duplex(1 << 20);
    let server = tokio::spawn(async move {
        let mut n = 0;
        let acc = proto::codec::accept(a).await;
        if let Ok(mut conn) = acc {
            while conn.recv().await.is_ok() {
                n += 1;
            }
        }
        n
    });
    let handshake =
        b"GET / HTTP/1.1\r\nHost: agent\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\
Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n";
    let _ = b.write_all(handshake).await;
    // tungstenite refuses bytes sent before its handshake answer: wait for it.
    let mut answer = Vec::new();
    let mut byte = [0u8; 1];
    while !answer.ends_with(b"\r\n\r\n") {
        match tokio::time::timeout(Duration::from_secs(20), b.read(&mut byte)).await {
            Ok(Ok(1)) => answer.push(byte[0]),
            _ => panic!(
                "no handshake answer: {:?}",
                String::from_utf8_lossy(&answer)
            ),
        }
    }
    let _ = b.write_all(&frames).await;
    let _ = b.shutdown().await;
    // Keep reading what the server answers so it never blocks on a full pipe.
    let drain = tokio::spawn(async move {
        let mut sink = tokio::io::sink();
        let _ = tokio::io::copy(&mut b, &mut sink).await;
    });
    let got = match tokio::time::timeout(Duration::from_secs(20), server).await {
        Ok(Ok(n)) => n,
        Ok(Err(e)) => {
            let p = mutate::save_failure("proto-ws", &frames);
            panic!("codec panicked ({e}); input saved at {}", p.display());
        }
        Err(_) => {
            let p = mutate::save_failure("proto-ws", &frames);
            panic!(
                "codec hung on a closed stream; input saved at {}",
                p.display()
            );
        }
    };
    drain.abort();
    got
}

/// One masked client text frame holding `payload`.
fn text_frame(payload: &[u8]) -> Vec<u8> {
    let mut f = vec![0x81];
    let len = payload.len();
    if len < 126 {
        f.push(0x80 | len as u8);
    } else if len < 65536 {
        f.push(0x80 | 126);
        f.extend_from_slice(&(len as u16).to_be_bytes());
    } else {
        f.push(0x80 | 127);
        f.extend_from_slice(&(len as u64).to_be_bytes());
    }
    let mask = [1u8, 2, 3, 4];
    f.extend_from_slice(&mask);
    f.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
    f
}

// See: #16 (fuzzing)
#[test]
fn decoder_survives_corpus_and_seeded_mutations() {
    let corpus: Vec<Vec<u8>> = corpus().into_iter().map(|(_, d)| d).collect();
    let parsed = corpus
        .iter()
        .filter(|d| {
            serde_json::from_slice::<Request>(d).is_ok()
                || serde_json::from_slice::<Response>(d).is_ok()
        })
        .count();
    assert!(
        parsed * 2 >= corpus.len(),
        "most seeds must be real messages"
    );
    let mut rng = mutate::Rng::new(mutate::seed());
    let iters = mutate::iterations(3000);
    for d in &corpus {
        decode(d);
    }
    for _ in 0..iters {
        let seed = &corpus[rng.below(corpus.len())];
        decode(&mutate::mutate(&mut rng, seed, &corpus, 64 * 1024));
    }
    // The framing layer: valid frames around mutated payloads, and mutated frames.
    let frames: Vec<Vec<u8>> = corpus.iter().map(|d| text_frame(d)).collect();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    for f in &frames {
        assert_eq!(
            rt.block_on(codec_round(f.clone())),
            1,
            "a valid frame is received"
        );
    }
    for i in 0..iters / 10 {
        let seed = &frames[rng.below(frames.len())];
        let bytes = if i % 2 == 0 {
            let pick = rng.below(corpus.len());
            let payload = mutate::mutate(&mut rng, &corpus[pick], &corpus, 64 * 1024);
            text_frame(&payload)
        } else {
            mutate::mutate(&mut rng, seed, &frames, 64 * 1024)
        };
        rt.block_on(codec_round(bytes));
    }
    let rss = mutate::peak_rss_kib();
    eprintln!("{iters} mutations, peak RSS {rss} KiB");
    assert!(rss < 256 * 1024, "peak RSS {rss} KiB");
}

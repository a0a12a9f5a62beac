#![no_main]
//! The deploy.toml parser on arbitrary text; errors must carry a message.
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    match deployctl::config::Config::parse(&text, "fuzz.toml", &|_| None) {
        Ok(c) => {
            for name in c.environment_names() {
                let _ = c.environment(&name);
            }
        }
        Err(e) => assert!(!e.to_string().is_empty()),
    }
});

//! Client keys, first found wins:
//!
//! 1. `DEPLOYCTL_SSH_KEY` holding the private key text itself (a CI secret);
//! 2. the `ssh_key` path from the config;
//! 3. ssh-agent via `SSH_AUTH_SOCK`, then the usual `~/.ssh/id_*` files.
//!
//! Key material never appears in an error message.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use russh::keys::PrivateKey;

#[derive(Clone)]
pub enum KeySource {
    Key {
        key: Arc<PrivateKey>,
        /// Where it came from, for messages: `DEPLOYCTL_SSH_KEY`, a path.
        origin: String,
    },
    Agent {
        path: PathBuf,
    },
}

impl std::fmt::Debug for KeySource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            KeySource::Key { origin, .. } => write!(f, "Key({origin})"),
            KeySource::Agent { path } => write!(f, "Agent({})", path.display()),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error(
        "DEPLOYCTL_SSH_KEY does not hold a usable private key ({0}); it must contain the \
         whole unencrypted key file, from -----BEGIN to -----END"
    )]
    EnvKey(String),
    #[error("cannot use ssh_key {path}: {detail}")]
    File { path: String, detail: String },
}

fn decode(text: &str) -> Result<PrivateKey, String> {
    russh::keys::decode_secret_key(text, None).map_err(|e| {
        let msg = e.to_string();
        if msg.to_lowercase().contains("encrypted") || msg.to_lowercase().contains("password") {
            "the key is passphrase-protected; load it into ssh-agent instead".to_owned()
        } else {
            // The parser's message never includes the key itself.
            msg
        }
    })
}

/// A hint when `ssh_key` names the public half of a key pair (`id_ed25519.pub`, or a
/// file holding one `ssh-ed25519 AAAA...` line): the private key is the file without
/// `.pub`.
fn public_key_hint(path: &Path, text: &str) -> Option<String> {
    let first = text.split_whitespace().next().unwrap_or_default();
    let looks_public = first.starts_with("ssh-")
        || first.starts_with("ecdsa-sha2-")
        || first.starts_with("sk-")
        || path.extension().is_some_and(|e| e == "pub");
    if !looks_public {
        return None;
    }
    let private = path.with_extension("");
    Some(if path.extension().is_some_and(|e| e == "pub") {
        format!(
            "this is a public key: ssh_key must name the private key, e.g. {}",
            private.display()
        )
    } else {
        "this is a public key: ssh_key must name the private key file (the one without .pub)"
            .to_owned()
    })
}

pub fn discover(
    env_key: Option<&str>,
    ssh_key: Option<&Path>,
    auth_sock: Option<PathBuf>,
    home: Option<&Path>,
) -> Result<Vec<KeySource>, KeyError> {
    if let Some(text) = env_key.filter(|t| !t.trim().is_empty()) {
        // A secret pasted into a CI variable often gains \r\n or loses its final newline.
        let text = text.replace("\r\n", "\n");
        let text = if text.ends_with('\n') {
            text
        } else {
            format!("{text}\n")
        };
        let key = decode(&text).map_err(KeyError::EnvKey)?;
        return Ok(vec![KeySource::Key {
            key: Arc::new(key),
            origin: "DEPLOYCTL_SSH_KEY".into(),
        }]);
    }
    if let Some(path) = ssh_key {
        let text = std::fs::read_to_string(path).map_err(|e| KeyError::File {
            path: path.display().to_string(),
            detail: e.to_string(),
        })?;
        let key = decode(&text).map_err(|detail| KeyError::File {
            path: path.display().to_string(),
            detail: match public_key_hint(path, &text) {
                Some(hint) => format!("{detail}; {hint}"),
                None => detail,
            },
        })?;
        return Ok(vec![KeySource::Key {
            key: Arc::new(key),
            origin: path.display().to_string(),
        }]);
    }
    let mut out = Vec::new();
    if let Some(sock) = auth_sock {
        out.push(KeySource::Agent { path: sock });
    }
    if let Some(home) = home {
        for name in ["id_ed25519", "id_ecdsa", "id_rsa"] {
            let p = home.join(".ssh").join(name);
            if let Ok(text) = std::fs::read_to_string(&p)
                && let Ok(key) = decode(&text)
            {
                out.push(KeySource::Key {
                    key: Arc::new(key),
                    origin: p.display().to_string(),
                });
            }
        }
    }
    Ok(out)
}

/// The keys for a host whose ssh config names `IdentityFile`s (and no `ssh_key` or
/// `DEPLOYCTL_SSH_KEY` overrides them): ssh-agent first, then those files, as OpenSSH
/// tries them; the default `~/.ssh/id_*` files are not tried then. A file that is
/// missing or cannot be used (e.g. passphrase-protected: load it into ssh-agent) is
/// skipped, as OpenSSH skips it.
pub fn from_identity_files(files: &[PathBuf], auth_sock: Option<PathBuf>) -> Vec<KeySource> {
    let mut out = Vec::new();
    if let Some(sock) = auth_sock {
        out.push(KeySource::Agent { path: sock });
    }
    for p in files {
        match std::fs::read_to_string(p)
            .map_err(|e| e.to_string())
            .and_then(|t| decode(&t))
        {
            Ok(key) => out.push(KeySource::Key {
                key: Arc::new(key),
                origin: p.display().to_string(),
            }),
            Err(e) => tracing::debug!("IdentityFile {} skipped: {e}", p.display()),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn keygen(dir: &Path) -> PathBuf {
        let p = dir.join("id");
        let ok = std::process::Command::new("ssh-keygen")
            .args(["-q", "-t", "ed25519", "-N", "", "-f"])
            .arg(&p)
            .status()
            .unwrap()
            .success();
        assert!(ok);
        p
    }

    #[test]
    fn env_key_wins_and_tolerates_crlf() {
        let dir = tempfile::tempdir().unwrap();
        let p = keygen(dir.path());
        let text = std::fs::read_to_string(&p).unwrap().replace('\n', "\r\n");
        let text = text.trim_end().to_owned();
        let keys = discover(Some(&text), Some(Path::new("/nonexistent")), None, None).unwrap();
        assert!(
            matches!(&keys[..], [KeySource::Key { origin, .. }] if origin == "DEPLOYCTL_SSH_KEY")
        );
    }

    #[test]
    fn a_bad_env_key_never_echoes_its_text() {
        let secret = "-----BEGIN OPENSSH PRIVATE KEY-----\nc2VjcmV0LXZhbHVlLTEyMzQ=\n-----END OPENSSH PRIVATE KEY-----\n";
        let err = discover(Some(secret), None, None, None)
            .unwrap_err()
            .to_string();
        assert!(err.contains("DEPLOYCTL_SSH_KEY"), "{err}");
        assert!(!err.contains("c2VjcmV0"), "{err}");
    }

    #[test]
    fn path_then_agent_then_default_files() {
        let dir = tempfile::tempdir().unwrap();
        let p = keygen(dir.path());
        let keys = discover(None, Some(&p), Some("/tmp/agent.sock".into()), None).unwrap();
        assert_eq!(keys.len(), 1, "the configured path wins over the agent");
        let err = discover(None, Some(&dir.path().join("missing")), None, None).unwrap_err();
        assert!(err.to_string().contains("missing"));
        let home = tempfile::tempdir().unwrap();
        std::fs::create_dir(home.path().join(".ssh")).unwrap();
        std::fs::copy(&p, home.path().join(".ssh/id_ed25519")).unwrap();
        let keys = discover(
            None,
            None,
            Some("/tmp/agent.sock".into()),
            Some(home.path()),
        )
        .unwrap();
        assert!(matches!(
            &keys[..],
            [KeySource::Agent { .. }, KeySource::Key { .. }]
        ));
    }

    #[test]
    // See: #18 (item 11): an ssh_key pointing at the .pub file said only "Could not read key".
    fn a_public_key_file_names_the_private_one() {
        let dir = tempfile::tempdir().unwrap();
        let p = keygen(dir.path());
        let public = p.with_extension("pub");
        let err = discover(None, Some(&public), None, None)
            .unwrap_err()
            .to_string();
        assert!(err.contains("this is a public key"), "{err}");
        assert!(err.contains(&format!("e.g. {}", p.display())), "{err}");
        // The same line under a name without .pub.
        let renamed = dir.path().join("deploy_key");
        std::fs::copy(&public, &renamed).unwrap();
        let err = discover(None, Some(&renamed), None, None)
            .unwrap_err()
            .to_string();
        assert!(err.contains("this is a public key"), "{err}");
        // Not every unreadable key is a public one.
        let junk = dir.path().join("junk");
        std::fs::write(&junk, "not a key\n").unwrap();
        let err = discover(None, Some(&junk), None, None)
            .unwrap_err()
            .to_string();
        assert!(!err.contains("public key"), "{err}");
    }
}

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
            detail,
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
}

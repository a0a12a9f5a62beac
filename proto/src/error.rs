//! Structured errors: a stable code a program can match on, a message a human can read,
//! and details (key/value) that name the thing at fault.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// What went wrong, in a form the controller maps onto its exit codes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorCode {
    /// The request was malformed or arrived out of order.
    BadRequest,
    /// The two sides speak different protocol versions.
    VersionMismatch,
    /// A path (usually `deploy_to`) lies outside the agent's `allowed_roots`.
    PathNotAllowed,
    /// Another session holds the app's deploy lock.
    Locked,
    /// A named release, instance or file does not exist.
    NotFound,
    /// The uploaded artifact was refused: unsafe entry, corrupt archive, too large.
    BadArtifact,
    /// The uploaded bytes do not hash to what the controller sent.
    ChecksumMismatch,
    /// A step of the deploy failed and the previous release is serving again.
    DeployFailed,
    /// A rollback failed: a human must look.
    RollbackFailed,
    /// The agent is shutting down and takes no new work.
    ShuttingDown,
    /// A filesystem or process error on the server.
    Io,
    /// A bug or unexpected state in the agent.
    Internal,
}

/// The error an agent answers with.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
#[error("{message}")]
pub struct ProtoError {
    pub code: ErrorCode,
    pub message: String,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub details: BTreeMap<String, String>,
}

impl ProtoError {
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        Self {
            code,
            message: message.into(),
            details: BTreeMap::new(),
        }
    }

    /// Adds one detail, e.g. `("entry", "../etc/passwd")`.
    pub fn with(mut self, key: &str, value: impl Into<String>) -> Self {
        self.details.insert(key.to_owned(), value.into());
        self
    }
}

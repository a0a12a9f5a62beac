//! The exit codes deployctl promises (SPEC "Exit codes").

/// Success.
pub const OK: u8 = 0;
/// The deploy failed and every host was rolled back cleanly (or never switched).
pub const DEPLOY_FAILED: u8 = 1;
/// Usage or configuration error: nothing was changed.
pub const USAGE: u8 = 2;
/// Could not connect, authenticate, or verify a host key; or the connection was lost (or
/// the agent stopped) before a host's upload had finished: nothing changed on that host.
pub const CONNECT: u8 = 3;
/// Another deploy holds the lock.
pub const LOCKED: u8 = 4;
/// A rollback failed or the fleet is on mixed versions: a human must look. Also: contact
/// was lost after the agent took the deploy over, so its outcome is unknown here.
pub const NEEDS_HUMAN: u8 = 5;

/// A failure that ends the command with an exit code and a message.
#[derive(Debug)]
pub struct Failure {
    pub code: u8,
    pub message: String,
}

impl Failure {
    pub fn new(code: u8, message: impl Into<String>) -> Self {
        Self {
            code,
            message: message.into(),
        }
    }
    pub fn usage(message: impl Into<String>) -> Self {
        Self::new(USAGE, message)
    }
}

impl std::fmt::Display for Failure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)
    }
}

/// Every code with its meaning, for the man pages' EXIT STATUS section.
pub const MEANINGS: [(u8, &str); 6] = [
    (OK, "Success."),
    (
        DEPLOY_FAILED,
        "The deploy failed and every host was rolled back cleanly (or never switched).",
    ),
    (USAGE, "Usage or configuration error: nothing was changed."),
    (
        CONNECT,
        "Could not connect, authenticate, or verify a host key.",
    ),
    (LOCKED, "Another deploy holds the lock."),
    (
        NEEDS_HUMAN,
        "A rollback failed or the fleet is on mixed versions: a human must look.",
    ),
];

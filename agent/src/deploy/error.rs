//! What a deploy step fails with, one variant per kind of failure (in the style of
//! deploy-rs's `ActivateError`): the driver decides what a failure leads to from the
//! step alone ([`super::machine`]); the variant says why, and its message is what the
//! report, the history and the controller show.

use crate::exec::ExecError;

#[derive(Debug, thiserror::Error)]
pub enum StepError {
    /// The phase could not be written before the step: the step did not act.
    #[error("cannot write the journal: {0}")]
    Journal(#[source] std::io::Error),
    /// An app command (`migrate`, `restart`): could not spawn, bad exit status, killed
    /// or timed out; [`ExecError`] keeps which.
    #[error(transparent)]
    Command(#[from] ExecError),
    /// An agent command (compose, docker) failed; `output` is the end of what it printed
    /// (compose's own message), shown on the same line.
    #[error("{}", crate::exec::with_output(&.source.to_string(), .output))]
    Tool { source: ExecError, output: String },
    /// The health check did not pass; the message says what it answered.
    #[error("{0}")]
    Health(String),
    /// A file or directory could not be read or written; the message names it.
    #[error("{0}")]
    Io(String),
    /// What the release or its spec asks for cannot be done (a shared path outside the
    /// release, compose files missing, no free port, no compose on the host).
    #[error("{0}")]
    Refused(String),
    /// A step's failure, with what the step was doing.
    #[error("{context}: {source}")]
    In {
        context: String,
        #[source]
        source: Box<StepError>,
    },
}

impl StepError {
    /// This failure, said to have happened while doing `context`.
    pub fn context(self, context: impl Into<String>) -> Self {
        StepError::In {
            context: context.into(),
            source: Box::new(self),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn messages_keep_the_words_the_reports_always_had() {
        let status = ExecError::Status {
            command: "x".into(),
            code: 3,
        };
        assert_eq!(
            StepError::from(status)
                .context("migration failed")
                .to_string(),
            "migration failed: `x` exited with status 3"
        );
        let timeout = ExecError::Timeout {
            command: "up".into(),
            timeout: Duration::from_secs(2),
        };
        let tool = StepError::Tool {
            source: timeout,
            output: "a\nERROR: boom\n".into(),
        };
        assert_eq!(
            tool.to_string(),
            "`up` timed out after 2s and was killed: a | ERROR: boom"
        );
        let io = std::io::Error::other("disk full");
        assert_eq!(
            StepError::Journal(io).to_string(),
            "cannot write the journal: disk full"
        );
    }
}

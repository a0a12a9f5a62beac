//! Version labels (`push --version`, `promote --version`): checked by the controller
//! before it connects and again by the agent before it takes the lock, so a label that
//! would break a table, a terminal or a log line never reaches the history.

/// The longest label accepted, in bytes. A git SHA is 40, a tag rarely over 50.
pub const MAX_LABEL_BYTES: usize = 128;

/// `Ok` when `label` may name a release: 1 to [`MAX_LABEL_BYTES`] bytes, no control
/// characters (newlines, escapes, NUL), no leading or trailing whitespace. The error says
/// what is wrong without echoing a long label back.
pub fn validate_label(label: &str) -> Result<(), String> {
    if label.is_empty() {
        return Err("the version label is empty".into());
    }
    if label.len() > MAX_LABEL_BYTES {
        return Err(format!(
            "the version label is {} bytes long; at most {MAX_LABEL_BYTES} are allowed",
            label.len()
        ));
    }
    if let Some((i, c)) = label.char_indices().find(|(_, c)| c.is_control()) {
        return Err(format!(
            "the version label has a control character ({:?}) at byte {i}",
            c
        ));
    }
    if label.trim() != label {
        return Err("the version label starts or ends with whitespace".into());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn labels() {
        for ok in [
            "v1.4.2",
            "0123456789abcdef0123456789abcdef01234567",
            "release 7",
            "ünï",
        ] {
            assert_eq!(validate_label(ok), Ok(()), "{ok}");
        }
        let long = "x".repeat(100_000);
        let err = validate_label(&long).unwrap_err();
        assert!(err.contains("100000 bytes"), "{err}");
        assert!(err.len() < 200, "the error does not echo the label");
        assert!(validate_label(&"x".repeat(MAX_LABEL_BYTES)).is_ok());
        for bad in [
            "",
            "a\nb",
            "a\u{1b}[31m",
            "nul\0",
            " lead",
            "trail\t",
            "del\u{7f}",
        ] {
            assert!(validate_label(bad).is_err(), "{bad:?}");
        }
    }
}

//! Shell completion: `deployctl completions SHELL` prints a small script that asks
//! deployctl itself (`COMPLETE=SHELL deployctl -- WORDS...`) what may come next, so
//! completions know the environments in `./deploy.toml` (or `$DEPLOYCTL_CONFIG`) and never
//! offer hidden commands. [`complete_if_asked`] answers those calls before clap parses.

use std::io::Write;
use std::path::PathBuf;

use clap::CommandFactory;
use clap_complete::Shell;
use clap_complete::env::Shells;

use crate::cli::Cli;
use crate::config::environments_in;

/// The environment variable the shell scripts set when they ask for completions.
const VAR: &str = "COMPLETE";

/// Answers a completion request and exits, when the process was started for one.
pub fn complete_if_asked() {
    clap_complete::CompleteEnv::with_factory(Cli::command)
        .var(VAR)
        .complete();
}

/// Writes the registration script for `shell` (what `deployctl completions SHELL` prints).
pub fn write_script(shell: Shell, out: &mut dyn Write) -> std::io::Result<()> {
    let name = shell.to_string();
    let shells = Shells::builtins();
    let Some(completer) = shells.completer(&name) else {
        return Err(std::io::Error::other(format!(
            "no dynamic completion for {name}"
        )));
    };
    let mut script = Vec::new();
    completer.write_registration(VAR, "deployctl", "deployctl", "deployctl", &mut script)?;
    let mut script = String::from_utf8_lossy(&script).into_owned();
    if shell == Shell::Bash {
        // With `-o bashdefault`, bash falls back to file names whenever we offer nothing,
        // so `--to <TAB>` would list the files in the current directory: release ids are
        // not files. Paths are still completed where an argument takes one.
        script = script.replace(" -o bashdefault", "");
    }
    out.write_all(script.as_bytes())
}

/// For a command line that lacks its environment: the environments the config defines
/// (`--config` from `args`, `$DEPLOYCTL_CONFIG`, or `./deploy.toml`), as a line to print.
pub fn missing_environment_hint(args: &[String]) -> String {
    let from_args = args.iter().enumerate().find_map(|(i, a)| {
        a.strip_prefix("--config=").map(str::to_owned).or_else(|| {
            (a == "--config")
                .then(|| args.get(i + 1).cloned())
                .flatten()
        })
    });
    let path: PathBuf = from_args
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("DEPLOYCTL_CONFIG").map(PathBuf::from))
        .unwrap_or_else(|| "deploy.toml".into());
    let names = environments_in(&path);
    if names.is_empty() {
        format!(
            "{} defines no environments (or cannot be read); `deployctl init` writes one to start from",
            path.display()
        )
    } else {
        format!("environments in {}: {}", path.display(), names.join(", "))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bash_script_does_not_fall_back_to_file_names() {
        let mut out = Vec::new();
        write_script(Shell::Bash, &mut out).unwrap();
        let script = String::from_utf8(out).unwrap();
        assert!(script.contains("complete "), "{script}");
        assert!(!script.contains("bashdefault"), "{script}");
        assert!(script.contains("COMPLETE=\"bash\""), "{script}");
    }

    #[test]
    fn the_hint_lists_the_environments_of_the_named_config() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("d.toml");
        std::fs::write(
            &p,
            "app = \"x\"\n[environments.staging]\nhosts = [\"a\"]\n[environments.prod]\nhosts = [\"b\"]\n",
        )
        .unwrap();
        let args = ["deployctl", "--config", p.to_str().unwrap(), "push"].map(String::from);
        let hint = missing_environment_hint(&args);
        assert!(hint.ends_with(": prod, staging"), "{hint}");
        let args = ["deployctl".to_owned(), format!("--config={}", p.display())];
        assert!(missing_environment_hint(&args).contains("prod, staging"));
        let args = ["deployctl", "--config", "/nonexistent.toml", "push"].map(String::from);
        let hint = missing_environment_hint(&args);
        assert!(
            hint.contains("/nonexistent.toml defines no environments"),
            "{hint}"
        );
    }

    #[test]
    fn every_shell_has_a_script() {
        for shell in [
            Shell::Bash,
            Shell::Zsh,
            Shell::Fish,
            Shell::Elvish,
            Shell::PowerShell,
        ] {
            let mut out = Vec::new();
            write_script(shell, &mut out).unwrap();
            assert!(!out.is_empty(), "{shell}");
        }
    }
}

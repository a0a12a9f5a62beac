//! `deployctl man`: one roff page per command (`deployctl(1)`, `deployctl-push(1)`, ...),
//! rendered from the same clap definitions as `--help`, each with an EXIT STATUS section.

use std::io::Write;
use std::path::{Path, PathBuf};

use clap::CommandFactory;

use crate::cli::Cli;
use crate::exit;

/// Every page as (file name, roff): the top page first, then one per visible subcommand.
pub fn pages() -> Vec<(String, Vec<u8>)> {
    let mut root = Cli::command().disable_help_subcommand(true);
    // Building sets each subcommand's display name ("deployctl-push"), which names its page.
    root.build();
    let mut out = vec![render(&root)];
    out.extend(
        root.get_subcommands()
            .filter(|c| !c.is_hide_set())
            .map(render),
    );
    out
}

/// The page of one command: `None` for deployctl(1) itself, or a subcommand's name.
pub fn page(command: Option<&str>) -> Option<Vec<u8>> {
    let wanted = match command {
        None => "deployctl.1".to_owned(),
        Some(name) => format!("deployctl-{name}.1"),
    };
    pages()
        .into_iter()
        .find(|(file, _)| *file == wanted)
        .map(|(_, roff)| roff)
}

/// Writes every page into `dir` (created when missing); returns the files written.
pub fn write_all(dir: &Path) -> std::io::Result<Vec<PathBuf>> {
    std::fs::create_dir_all(dir)?;
    pages()
        .into_iter()
        .map(|(file, roff)| {
            let path = dir.join(file);
            std::fs::write(&path, roff)?;
            Ok(path)
        })
        .collect()
}

fn render(cmd: &clap::Command) -> (String, Vec<u8>) {
    let man = clap_mangen::Man::new(cmd.clone()).manual("deployctl manual");
    let mut roff = Vec::new();
    // Writing to a Vec cannot fail.
    let _ = render_sections(&man, cmd, &mut roff);
    (man.get_filename(), roff)
}

fn render_sections(
    man: &clap_mangen::Man,
    cmd: &clap::Command,
    w: &mut dyn Write,
) -> std::io::Result<()> {
    man.render_title(w)?;
    man.render_name_section(w)?;
    man.render_synopsis_section(w)?;
    man.render_description_section(w)?;
    if cmd.get_arguments().any(|a| !a.is_hide_set()) {
        man.render_options_section(w)?;
    }
    if cmd.has_subcommands() {
        man.render_subcommands_section(w)?;
    }
    if let Some(text) = cmd.get_after_long_help().or(cmd.get_after_help()) {
        render_examples(&text.to_string(), w)?;
    }
    render_exit_status(w)?;
    // clap_mangen unwraps the version: subcommands have none of their own.
    if cmd.get_version().is_some() {
        man.render_version_section(w)?;
    }
    Ok(())
}

/// The `after_help` text (`Examples:` and indented command lines) as an EXAMPLES section,
/// kept verbatim (`.nf`) so each command stays on its line.
fn render_examples(text: &str, w: &mut dyn Write) -> std::io::Result<()> {
    let body = text.strip_prefix("Examples:").unwrap_or(text);
    writeln!(w, ".SH EXAMPLES\n.nf")?;
    for line in body.lines().filter(|l| !l.trim().is_empty()) {
        writeln!(w, "{}", roff_escape(line.trim_start()))?;
    }
    writeln!(w, ".fi")
}

fn render_exit_status(w: &mut dyn Write) -> std::io::Result<()> {
    writeln!(w, ".SH \"EXIT STATUS\"")?;
    for (code, meaning) in exit::MEANINGS {
        writeln!(w, ".TP\n\\fB{code}\\fR\n{}", roff_escape(meaning))?;
    }
    Ok(())
}

/// Text safe in a roff paragraph: backslashes doubled, no line starting with a control
/// character.
fn roff_escape(text: &str) -> String {
    let text = text.replace('\\', "\\\\");
    match text.chars().next() {
        Some('.' | '\'') => format!("\\&{text}"),
        _ => text,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_page_named_in_a_page_exists() {
        let pages = pages();
        let names: Vec<&str> = pages.iter().map(|(f, _)| f.as_str()).collect();
        assert!(names.contains(&"deployctl.1"), "{names:?}");
        assert!(names.contains(&"deployctl-push.1"), "{names:?}");
        assert!(!names.iter().any(|n| n.contains("demo-app")), "{names:?}");
        for (file, roff) in &pages {
            let text = String::from_utf8_lossy(roff);
            assert!(text.contains(".SH \"EXIT STATUS\""), "{file}");
            assert!(!text.contains(".SH EXTRA"), "{file}");
            for code in 0..=5 {
                assert!(text.contains(&format!("\\fB{code}\\fR")), "{file}: {code}");
            }
            // Every `deployctl-x(1)` reference has its page.
            for (i, _) in text.match_indices("deployctl\\-") {
                let rest = &text[i + "deployctl\\-".len()..];
                let name: String = rest
                    .chars()
                    .take_while(|c| c.is_ascii_alphanumeric() || *c == '-')
                    .collect();
                if rest[name.len()..].starts_with("(1)") {
                    let page = format!("deployctl-{name}.1");
                    assert!(names.contains(&page.as_str()), "{file} refers to {page}");
                }
            }
        }
    }

    #[test]
    fn one_page_by_name() {
        let push = String::from_utf8(page(Some("push")).unwrap()).unwrap();
        assert!(push.contains("\\-\\-artifact"), "{push}");
        assert!(
            push.contains(".SH EXAMPLES\n.nf\ndeployctl push staging\n"),
            "{push}"
        );
        assert!(page(Some("no-such-command")).is_none());
        assert!(page(Some("demo-app")).is_none());
    }
}

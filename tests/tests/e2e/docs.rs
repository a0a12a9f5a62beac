//! The files users copy and read: `examples/` (YAML, GitHub workflows), `systemd/` (the
//! unit, its drop-ins, sysusers, tmpfiles, sudoers, agent.toml) and `docs/`.
//!
//! - Every YAML file under `examples/` parses; every workflow and composite action has
//!   the shape GitHub needs; deploy jobs join Tailscale first and hold a per-environment
//!   concurrency group that never cancels a deploy in flight.
//! - Every `deployctl ...` command in a workflow's `run:` (and in the docs' `sh` blocks)
//!   uses only subcommands and flags that the real binary's `--help` lists, with the
//!   positional arguments its usage line asks for.
//! - The unit passes `systemd-analyze verify` (alone and with each drop-in) and keeps a
//!   low exposure in `systemd-analyze security`; the sudoers snippet passes `visudo -c`;
//!   sysusers and tmpfiles apply to a scratch root. A missing tool fails the test under
//!   `CI=true` (scripts/test installs sudo and systemd); elsewhere it is a note and a skip.
//! - The shipped agent.toml is accepted by the real agent, and the systemd files agree
//!   with each other (user, group, socket dir, allowed roots).
//! - The reference pages cover every config key, `DEPLOYCTL_*` variable, exit code and
//!   agent config key in the source, and their relative links resolve.

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use deployctl_e2e::require::{missing, require};
use deployctl_e2e::{Agent, TestEnv, bin};
use yaml_rust2::{Yaml, YamlLoader};

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ has a parent")
        .to_path_buf()
}

fn read(path: &Path) -> String {
    fs::read_to_string(path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()))
}

/// Files under `dir` (recursively, hidden ones included) whose name ends with one of
/// `suffixes`, sorted.
fn files_under(dir: &Path, suffixes: &[&str]) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let entries = fs::read_dir(&d).unwrap_or_else(|e| panic!("read {}: {e}", d.display()));
        for entry in entries {
            let path = entry.expect("dir entry").path();
            if path.is_dir() {
                stack.push(path);
            } else if let Some(name) = path.file_name().and_then(|n| n.to_str())
                && suffixes.iter().any(|s| name.ends_with(s))
            {
                out.push(path);
            }
        }
    }
    out.sort();
    out
}

fn rel(path: &Path) -> String {
    path.strip_prefix(repo())
        .unwrap_or(path)
        .display()
        .to_string()
}

// ---------------------------------------------------------------------------------------
// YAML and workflow shape
// ---------------------------------------------------------------------------------------

fn load_yaml(path: &Path) -> Vec<Yaml> {
    YamlLoader::load_from_str(&read(path))
        .unwrap_or_else(|e| panic!("{} is not valid YAML: {e}", rel(path)))
}

fn yaml_files() -> Vec<PathBuf> {
    files_under(&repo().join("examples"), &[".yml", ".yaml"])
}

/// Workflows (`examples/github/*.yml`) and composite actions (`.../action.yml`).
fn github_files() -> (Vec<PathBuf>, Vec<PathBuf>) {
    let dir = repo().join("examples/github");
    let all = files_under(&dir, &[".yml", ".yaml"]);
    let (actions, workflows) = all.into_iter().partition(|p| {
        p.file_name()
            .is_some_and(|n| n == "action.yml" || n == "action.yaml")
    });
    (workflows, actions)
}

fn key<'a>(y: &'a Yaml, k: &str) -> &'a Yaml {
    &y[k]
}

fn str_of(y: &Yaml) -> Option<&str> {
    y.as_str()
}

#[test]
fn every_yaml_file_under_examples_parses() {
    let files = yaml_files();
    assert!(
        files
            .iter()
            .any(|p| p.starts_with(repo().join("examples/github"))),
        "no workflows found under examples/github: {files:?}"
    );
    for path in &files {
        let docs = load_yaml(path);
        assert!(
            !docs.is_empty() && docs.iter().all(|d| !d.is_null() && !d.is_badvalue()),
            "{} holds no YAML document",
            rel(path)
        );
    }
}

/// The steps of every job of a workflow, with the job's name and the job itself.
fn jobs(doc: &Yaml) -> Vec<(String, &Yaml)> {
    doc["jobs"]
        .as_hash()
        .map(|h| {
            h.iter()
                .map(|(k, v)| (k.as_str().unwrap_or("?").to_owned(), v))
                .collect()
        })
        .unwrap_or_default()
}

fn steps(job: &Yaml) -> &[Yaml] {
    job["steps"].as_vec().map(Vec::as_slice).unwrap_or(&[])
}

#[test]
fn workflows_and_actions_have_the_shape_github_needs() {
    let (workflows, actions) = github_files();
    for path in &workflows {
        let doc = &load_yaml(path)[0];
        let name = rel(path);
        assert!(str_of(key(doc, "name")).is_some(), "{name}: no `name`");
        assert!(!key(doc, "on").is_badvalue(), "{name}: no `on` trigger");
        let jobs = jobs(doc);
        assert!(!jobs.is_empty(), "{name}: no jobs");
        for (job_name, job) in jobs {
            let at = format!("{name}: job {job_name}");
            assert!(
                !job["runs-on"].is_badvalue(),
                "{at}: no runs-on (reusable workflows are not used here)"
            );
            let steps = steps(job);
            assert!(!steps.is_empty(), "{at}: no steps");
            for (i, step) in steps.iter().enumerate() {
                let run = step["run"].as_str();
                let uses = step["uses"].as_str();
                assert!(
                    run.is_some() != uses.is_some(),
                    "{at}: step {} needs exactly one of run/uses",
                    i + 1
                );
            }
            if let Some(needs) = job["needs"].as_str() {
                assert!(
                    !doc["jobs"][needs].is_badvalue(),
                    "{at}: needs unknown job {needs}"
                );
            }
        }
    }
    for path in &actions {
        let doc = &load_yaml(path)[0];
        let name = rel(path);
        assert!(str_of(key(doc, "name")).is_some(), "{name}: no `name`");
        assert!(
            str_of(key(doc, "description")).is_some(),
            "{name}: no `description`"
        );
        assert_eq!(
            doc["runs"]["using"].as_str(),
            Some("composite"),
            "{name}: runs.using"
        );
        for (i, step) in steps(&doc["runs"]).iter().enumerate() {
            if step["run"].as_str().is_some() {
                assert!(
                    step["shell"].as_str().is_some(),
                    "{name}: step {}: a composite action's run step needs `shell`",
                    i + 1
                );
            }
        }
    }
    // Every local action a workflow uses is one of ours, at the path it will be copied to.
    let ours: BTreeSet<String> = actions
        .iter()
        .filter_map(|p| p.parent()?.file_name()?.to_str().map(str::to_owned))
        .collect();
    for path in &workflows {
        for (_, job) in jobs(&load_yaml(path)[0]) {
            for step in steps(job) {
                if let Some(local) = step["uses"]
                    .as_str()
                    .and_then(|u| u.strip_prefix("./.github/actions/"))
                {
                    assert!(
                        ours.contains(local),
                        "{}: uses ./.github/actions/{local}, which examples/github/actions/ lacks",
                        rel(path)
                    );
                }
            }
        }
    }
}

/// The deployctl subcommand of the first deploying call in a step, if any.
fn deploying_sub(step: &Yaml) -> Option<String> {
    let script = step["run"].as_str()?;
    deployctl_calls(script)
        .into_iter()
        .filter_map(|args| first_subcommand(&args))
        .find(|sub| matches!(sub.as_str(), "push" | "rollback" | "check" | "bootstrap"))
}

#[test]
fn deploy_jobs_join_tailscale_first_and_never_cancel_a_deploy() {
    let (workflows, _) = github_files();
    let mut deploy_jobs = 0;
    for path in &workflows {
        let doc = &load_yaml(path)[0];
        for (job_name, job) in jobs(doc) {
            let at = format!("{}: job {job_name}", rel(path));
            let steps = steps(job);
            let Some(first_deploy) = steps.iter().position(|s| deploying_sub(s).is_some()) else {
                continue;
            };
            deploy_jobs += 1;
            let tailscale = steps.iter().position(|s| {
                s["uses"]
                    .as_str()
                    .is_some_and(|u| u.starts_with("tailscale/github-action@"))
            });
            assert!(
                tailscale.is_some_and(|t| t < first_deploy),
                "{at}: joins no tailnet before it runs deployctl"
            );
            let concurrency = if job["concurrency"].is_badvalue() {
                &doc["concurrency"]
            } else {
                &job["concurrency"]
            };
            let group = concurrency["group"]
                .as_str()
                .or(concurrency.as_str())
                .unwrap_or_else(|| panic!("{at}: no concurrency group"));
            assert!(
                group.starts_with("deploy-"),
                "{at}: concurrency group {group:?} is not deploy-<environment>"
            );
            assert_eq!(
                concurrency["cancel-in-progress"].as_bool(),
                Some(false),
                "{at}: cancel-in-progress must be false: cancelling a job mid-deploy loses its result"
            );
        }
    }
    assert!(
        deploy_jobs >= 3,
        "expected at least 3 deploy jobs, found {deploy_jobs}"
    );
}

// ---------------------------------------------------------------------------------------
// deployctl calls against the real --help
// ---------------------------------------------------------------------------------------

/// A shell word, or a break between commands (newline, `;`, `&&`, `||`, `|`, `&`,
/// parentheses).
#[derive(Debug, PartialEq)]
enum Tok {
    Word(String),
    Sep,
}

/// A small POSIX-shell lexer, enough for workflow scripts: quotes, backslashes, line
/// continuations, comments, `$( ... )` and `${{ ... }}` kept inside their word.
fn lex(script: &str) -> Vec<Tok> {
    let chars: Vec<char> = script.chars().collect();
    let mut out = Vec::new();
    let mut word = String::new();
    let mut in_word = false;
    let mut i = 0;
    let end_word = |out: &mut Vec<Tok>, word: &mut String, in_word: &mut bool| {
        if *in_word {
            out.push(Tok::Word(std::mem::take(word)));
            *in_word = false;
        }
    };
    while i < chars.len() {
        let c = chars[i];
        match c {
            '\\' if chars.get(i + 1) == Some(&'\n') => i += 2,
            '\\' => {
                if let Some(&n) = chars.get(i + 1) {
                    word.push(n);
                }
                in_word = true;
                i += 2;
            }
            '#' if !in_word => {
                while i < chars.len() && chars[i] != '\n' {
                    i += 1;
                }
            }
            ' ' | '\t' => {
                end_word(&mut out, &mut word, &mut in_word);
                i += 1;
            }
            '\n' | ';' | '&' | '|' | '(' | ')' => {
                end_word(&mut out, &mut word, &mut in_word);
                if out.last() != Some(&Tok::Sep) {
                    out.push(Tok::Sep);
                }
                i += 1;
            }
            '\'' => {
                in_word = true;
                i += 1;
                while i < chars.len() && chars[i] != '\'' {
                    word.push(chars[i]);
                    i += 1;
                }
                i += 1;
            }
            '"' => {
                in_word = true;
                i += 1;
                while i < chars.len() && chars[i] != '"' {
                    if chars[i] == '\\' && i + 1 < chars.len() && "\"\\$`".contains(chars[i + 1]) {
                        i += 1;
                    }
                    word.push(chars[i]);
                    i += 1;
                }
                i += 1;
            }
            '$' if chars.get(i + 1) == Some(&'(') => {
                // A command substitution stays part of its word.
                in_word = true;
                let mut depth = 0;
                while i < chars.len() {
                    let ch = chars[i];
                    word.push(ch);
                    i += 1;
                    match ch {
                        '(' => depth += 1,
                        ')' => {
                            depth -= 1;
                            if depth == 0 {
                                break;
                            }
                        }
                        _ => {}
                    }
                }
            }
            '$' if chars.get(i + 1) == Some(&'{') && chars.get(i + 2) == Some(&'{') => {
                // A GitHub expression, spaces and all, is part of its word.
                in_word = true;
                while i < chars.len() && !(chars[i] == '}' && chars.get(i + 1) == Some(&'}')) {
                    word.push(chars[i]);
                    i += 1;
                }
                word.push_str("}}");
                i += 2;
            }
            _ => {
                word.push(c);
                in_word = true;
                i += 1;
            }
        }
    }
    end_word(&mut out, &mut word, &mut in_word);
    out
}

/// The arguments of every `deployctl` command in a script (the program named
/// `deployctl`, or a path ending in `/deployctl`, in command position).
fn deployctl_calls(script: &str) -> Vec<Vec<String>> {
    const PREFIXES: &[&str] = &[
        "if", "then", "elif", "else", "do", "while", "until", "!", "{", "time", "exec", "command",
    ];
    let mut calls = Vec::new();
    let mut at_start = true;
    let mut current: Option<Vec<String>> = None;
    for tok in lex(script) {
        match tok {
            Tok::Sep => {
                calls.extend(current.take());
                at_start = true;
            }
            Tok::Word(w) => {
                if let Some(args) = current.as_mut() {
                    args.push(w);
                } else if at_start {
                    let assignment = w.split_once('=').is_some_and(|(name, _)| is_var_name(name));
                    if assignment || PREFIXES.contains(&w.as_str()) {
                        continue;
                    }
                    at_start = false;
                    if w == "deployctl" || w.ends_with("/deployctl") {
                        current = Some(Vec::new());
                    }
                }
            }
        }
    }
    calls.extend(current);
    calls
}

fn is_var_name(s: &str) -> bool {
    let mut chars = s.chars();
    chars
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum Arity {
    Switch,
    Value,
    Values,
}

#[derive(Debug, Default)]
struct Usage {
    /// `--long` and `-s` names.
    flags: BTreeMap<String, Arity>,
    required: usize,
    optional: usize,
    variadic: bool,
}

/// What `deployctl --help` and `deployctl SUB --help` say.
struct Help {
    root: Usage,
    commands: BTreeSet<String>,
    subs: BTreeMap<String, Usage>,
}

fn help_text(args: &[&str]) -> String {
    let out = Command::new(bin("deployctl"))
        .args(args)
        .env("COLUMNS", "300")
        .output()
        .expect("run deployctl --help");
    assert!(out.status.success(), "deployctl {args:?} failed");
    String::from_utf8(out.stdout).expect("utf-8 help")
}

/// Options and positionals from clap's help text.
fn parse_usage(help: &str) -> Usage {
    let mut u = Usage::default();
    if let Some(line) = help.lines().find(|l| l.starts_with("Usage: ")) {
        for w in line.split_whitespace().skip(3) {
            if w == "[OPTIONS]" || w == "<COMMAND>" {
                continue;
            }
            if w.ends_with("...") {
                u.variadic = true;
            }
            if w.starts_with('<') {
                u.required += 1;
            } else if w.starts_with('[') {
                u.optional += 1;
            }
        }
    }
    let mut in_options = false;
    for line in help.lines() {
        if line.ends_with(':') && !line.starts_with(' ') {
            in_options = line == "Options:";
            continue;
        }
        let trimmed = line.trim_start();
        let indent = line.len() - trimmed.len();
        if !in_options || !trimmed.starts_with('-') || indent > 6 {
            continue;
        }
        let spec = trimmed.split("  ").next().unwrap_or_default();
        let arity = if spec.ends_with("...") {
            Arity::Values
        } else if spec.contains('<') {
            Arity::Value
        } else {
            Arity::Switch
        };
        for part in spec.split([',', ' ']) {
            if part.starts_with('-') {
                u.flags.insert(part.to_owned(), arity);
            }
        }
    }
    u
}

impl Help {
    fn load() -> Help {
        let text = help_text(&["--help"]);
        let mut commands = BTreeSet::new();
        let mut in_commands = false;
        for line in text.lines() {
            if line == "Commands:" {
                in_commands = true;
            } else if in_commands {
                match line.split_whitespace().next() {
                    Some(name) if line.starts_with("  ") => {
                        commands.insert(name.to_owned());
                    }
                    _ => break,
                }
            }
        }
        assert!(
            commands.contains("push") && commands.contains("rollback"),
            "unexpected deployctl --help:\n{text}"
        );
        Help {
            root: parse_usage(&text),
            commands,
            subs: BTreeMap::new(),
        }
    }

    fn sub(&mut self, name: &str) -> &Usage {
        self.subs
            .entry(name.to_owned())
            .or_insert_with(|| parse_usage(&help_text(&[name, "--help"])))
    }

    /// Checks one call's arguments (everything after `deployctl`).
    fn check(&mut self, args: &[String]) -> Result<(), String> {
        let mut i = 0;
        // Global flags before the subcommand.
        while let Some(a) = args.get(i).filter(|a| a.starts_with('-')) {
            let name = a.split('=').next().unwrap_or(a);
            match self.root.flags.get(name) {
                Some(_) if matches!(name, "--help" | "-h" | "--version" | "-V") => return Ok(()),
                Some(Arity::Switch) => i += 1,
                Some(_) if a.contains('=') => i += 1,
                Some(_) => i += 2,
                None => return Err(format!("unknown global flag {a}")),
            }
        }
        let Some(sub) = args.get(i) else {
            return Err("no subcommand".into());
        };
        if sub.starts_with('$') {
            return Err(format!(
                "the subcommand {sub} is not literal, so it cannot be checked: spell it out"
            ));
        }
        if !self.commands.contains(sub.as_str()) {
            return Err(format!(
                "`deployctl {sub}` is not a command (deployctl --help lists: {})",
                self.commands.iter().cloned().collect::<Vec<_>>().join(", ")
            ));
        }
        let sub = sub.clone();
        let usage = self.sub(&sub);
        let mut positionals = 0;
        let mut rest = args[i + 1..].iter().peekable();
        while let Some(a) = rest.next() {
            if a == "--" {
                positionals += rest.by_ref().count();
                break;
            }
            if a.starts_with('-') && a.len() > 1 {
                let (name, inline) = match a.split_once('=') {
                    Some((n, _)) => (n, true),
                    None => (a.as_str(), false),
                };
                match usage.flags.get(name) {
                    None => {
                        return Err(format!(
                            "`deployctl {sub}` has no flag {name} (its --help lists: {})",
                            usage.flags.keys().cloned().collect::<Vec<_>>().join(" ")
                        ));
                    }
                    Some(Arity::Switch) if inline => {
                        return Err(format!("{name} takes no value"));
                    }
                    Some(Arity::Switch) => {}
                    Some(Arity::Value) if inline => {}
                    Some(Arity::Value) => {
                        if rest.next().is_none() {
                            return Err(format!("{name} needs a value"));
                        }
                    }
                    Some(Arity::Values) => {
                        let mut n = usize::from(inline);
                        while rest.peek().is_some_and(|v| !v.starts_with('-')) {
                            rest.next();
                            n += 1;
                        }
                        if n == 0 {
                            return Err(format!("{name} needs at least one value"));
                        }
                    }
                }
            } else {
                positionals += 1;
            }
        }
        if positionals < usage.required
            || (!usage.variadic && positionals > usage.required + usage.optional)
        {
            return Err(format!(
                "`deployctl {sub}` takes {} positional argument(s){}, got {positionals}",
                usage.required,
                if usage.optional > 0 {
                    format!(" (+{} optional)", usage.optional)
                } else {
                    String::new()
                }
            ));
        }
        Ok(())
    }
}

fn first_subcommand(args: &[String]) -> Option<String> {
    let mut i = 0;
    while let Some(a) = args.get(i) {
        if a == "--config" {
            i += 2;
        } else if a.starts_with('-') {
            i += 1;
        } else {
            return Some(a.clone());
        }
    }
    None
}

/// Every `run:` script in a workflow or composite action.
fn run_scripts(doc: &Yaml) -> Vec<String> {
    let mut out = Vec::new();
    for (_, job) in jobs(doc) {
        out.extend(
            steps(job)
                .iter()
                .filter_map(|s| s["run"].as_str().map(str::to_owned)),
        );
    }
    out.extend(
        steps(&doc["runs"])
            .iter()
            .filter_map(|s| s["run"].as_str().map(str::to_owned)),
    );
    out
}

#[test]
fn the_lexer_finds_deployctl_in_command_position_only() {
    let script = "cargo install --git https://x/deployctl deployctl\n\
                  echo \"deployctl push nowhere\" # deployctl push x\n\
                  FOO=1 deployctl check staging && deployctl push staging \\\n  --version \"${{ github.sha }}\" --yes\n\
                  if [ -n \"$X\" ]; then \"$HOME/bin/deployctl\" rollback prod --to \"$X\"; fi\n\
                  run_id=\"$(gh run list --jq '.[0] // empty')\"";
    assert_eq!(
        deployctl_calls(script),
        vec![
            vec!["check", "staging"],
            vec!["push", "staging", "--version", "${{ github.sha }}", "--yes"],
            vec!["rollback", "prod", "--to", "$X"],
        ]
    );
}

#[test]
fn the_checker_refuses_what_deployctl_would_refuse() {
    let mut help = Help::load();
    let call = |s: &str| -> Vec<String> { s.split_whitespace().map(str::to_owned).collect() };
    for good in [
        "push staging --yes",
        "--config deploy/deploy.toml push staging --artifact dist/a.tar.gz --version v1",
        "push staging --lock-wait=5m",
        "rollback production --to v1.4.1 --yes",
        "status staging --json",
        "--version",
    ] {
        help.check(&call(good))
            .unwrap_or_else(|e| panic!("{good}: {e}"));
    }
    for bad in [
        "push",
        "push staging --forcefully",
        "push staging extra",
        "deploy staging",
        "rollback production --to",
        "$CMD staging",
        "status staging --json=yes",
    ] {
        assert!(help.check(&call(bad)).is_err(), "{bad} was accepted");
    }
}

#[test]
fn workflows_call_deployctl_as_its_help_documents() {
    let mut help = Help::load();
    let (workflows, actions) = github_files();
    let mut checked = 0;
    let mut problems = Vec::new();
    for path in workflows.iter().chain(&actions) {
        for script in run_scripts(&load_yaml(path)[0]) {
            for args in deployctl_calls(&script) {
                checked += 1;
                if let Err(e) = help.check(&args) {
                    problems.push(format!(
                        "{}: `deployctl {}`: {e}",
                        rel(path),
                        args.join(" ")
                    ));
                }
            }
        }
    }
    assert!(problems.is_empty(), "{}", problems.join("\n"));
    assert!(
        checked >= 8,
        "only {checked} deployctl calls found in the workflows"
    );
}

/// The contents of every fenced block tagged `sh`, `bash` or `shell` in a Markdown file.
fn shell_blocks(markdown: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut current: Option<String> = None;
    for line in markdown.lines() {
        let fence = line.trim_start().strip_prefix("```");
        match (&mut current, fence) {
            (None, Some(lang)) if matches!(lang.trim(), "sh" | "bash" | "shell") => {
                current = Some(String::new());
            }
            (Some(block), Some(_)) => {
                out.push(std::mem::take(block));
                current = None;
            }
            (Some(block), None) => {
                block.push_str(line);
                block.push('\n');
            }
            (None, Some(_)) | (None, None) => {}
        }
    }
    out
}

fn doc_files() -> Vec<PathBuf> {
    files_under(&repo().join("docs"), &[".md"])
}

#[test]
fn docs_shell_examples_call_deployctl_as_its_help_documents() {
    let mut help = Help::load();
    let mut problems = Vec::new();
    for path in doc_files() {
        for block in shell_blocks(&read(&path)) {
            for args in deployctl_calls(&block) {
                if let Err(e) = help.check(&args) {
                    problems.push(format!(
                        "{}: `deployctl {}`: {e}",
                        rel(&path),
                        args.join(" ")
                    ));
                }
            }
        }
    }
    assert!(problems.is_empty(), "{}", problems.join("\n"));
}

// ---------------------------------------------------------------------------------------
// systemd
// ---------------------------------------------------------------------------------------

const UNIT: &str = "systemd/deploy-agent.service";
const SHIPPED_BIN: &str = "/usr/local/bin/deploy-agent";

/// `Key=value` lines of a unit or drop-in (the last one wins, as in systemd, except for
/// list settings, which we do not need here).
fn unit_settings(text: &str) -> BTreeMap<String, String> {
    text.lines()
        .map(str::trim)
        .filter(|l| !l.starts_with('#') && !l.starts_with('['))
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| (k.trim().to_owned(), v.trim().to_owned()))
        .collect()
}

/// The unit, with `ExecStart` pointed at the freshly built agent (`verify` checks that
/// the binary exists), written to `dir`; the drop-in, if any, goes to its `.d` dir.
fn write_unit_for_verify(dir: &Path, drop_in: Option<&Path>) -> PathBuf {
    let text = read(&repo().join(UNIT));
    let exec = format!("ExecStart={SHIPPED_BIN} ");
    assert_eq!(
        text.matches(&exec).count(),
        1,
        "{UNIT} must start {SHIPPED_BIN} exactly once"
    );
    let agent = bin("deploy-agent");
    let text = text.replace(&exec, &format!("ExecStart={} ", agent.display()));
    let unit = dir.join("deploy-agent.service");
    fs::write(&unit, text).expect("write unit");
    let d = dir.join("deploy-agent.service.d");
    let _ = fs::remove_dir_all(&d);
    if let Some(drop_in) = drop_in {
        fs::create_dir_all(&d).expect("mkdir .d");
        fs::copy(drop_in, d.join(drop_in.file_name().expect("name"))).expect("copy drop-in");
    }
    unit
}

fn drop_ins() -> Vec<PathBuf> {
    files_under(&repo().join("systemd/deploy-agent.service.d"), &[".conf"])
}

#[test]
fn unit_passes_systemd_analyze_verify_alone_and_with_each_drop_in() {
    if !require(
        "systemd-analyze",
        "runs `systemd-analyze verify` on the unit (apt-get install systemd)",
    ) {
        return;
    }
    let env = TestEnv::new();
    let mut variants: Vec<Option<PathBuf>> = vec![None];
    variants.extend(drop_ins().into_iter().map(Some));
    assert!(
        variants.len() >= 2,
        "no drop-ins in systemd/deploy-agent.service.d/"
    );
    for drop_in in &variants {
        let unit = write_unit_for_verify(env.root(), drop_in.as_deref());
        let out = Command::new("systemd-analyze")
            .arg("verify")
            .arg(&unit)
            .output()
            .expect("run systemd-analyze");
        let stderr = String::from_utf8_lossy(&out.stderr);
        let ours: Vec<&str> = stderr
            .lines()
            .filter(|l| l.contains("deploy-agent") || l.contains(&*env.root().to_string_lossy()))
            .collect();
        let what = drop_in
            .as_deref()
            .map(|d| format!("{UNIT} + {}", rel(d)))
            .unwrap_or_else(|| UNIT.to_owned());
        assert!(
            out.status.success() && ours.is_empty(),
            "systemd-analyze verify {what}: {}\n{stderr}",
            out.status
        );
    }
}

/// The cutover recipe's slot unit (docs/cutover.md) is a valid template: an instance of
/// it passes `systemd-analyze verify`, with `ExecStart` pointed at a binary that exists
/// (verify checks that) and the working dir at one that exists.
#[test]
fn the_sample_slot_unit_passes_systemd_analyze_verify() {
    if !require(
        "systemd-analyze",
        "runs `systemd-analyze verify` on examples/cutover/myapp@.service (apt-get install systemd)",
    ) {
        return;
    }
    let path = repo().join("examples/cutover/myapp@.service");
    let text = read(&path);
    for needle in [
        "ExecStart=/srv/myapp/current/bin/server",
        "WorkingDirectory=/srv/myapp/current",
        "127.0.0.1:%i",
    ] {
        assert!(text.contains(needle), "{} lacks {needle}", rel(&path));
    }
    let text = text
        .replace(
            "ExecStart=/srv/myapp/current/bin/server",
            "ExecStart=/bin/true",
        )
        .replace("WorkingDirectory=/srv/myapp/current", "WorkingDirectory=/");
    let env = TestEnv::new();
    let unit = env.write("myapp@4001.service", text);
    let out = Command::new("systemd-analyze")
        .arg("verify")
        .arg(&unit)
        .output()
        .expect("run systemd-analyze");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success() && !stderr.contains("myapp@"),
        "systemd-analyze verify {}: {}\n{stderr}",
        rel(&path),
        out.status
    );
}

#[test]
fn unit_keeps_a_low_exposure_in_systemd_analyze_security() {
    if !require(
        "systemd-analyze",
        "runs `systemd-analyze security` on the unit (apt-get install systemd)",
    ) {
        return;
    }
    let env = TestEnv::new();
    let unit = write_unit_for_verify(env.root(), None);
    // --threshold is on a 0-100 scale: 20 = an exposure of 2.0 ("OK" goes up to 3.9).
    let out = Command::new("systemd-analyze")
        .args(["security", "--offline=true", "--threshold=20"])
        .arg(&unit)
        .output()
        .expect("run systemd-analyze");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    if text.contains("unrecognized option") || text.contains("Unknown command") {
        let _ = missing(
            "`systemd-analyze security --offline` (systemd v250+)",
            &format!("checks the unit's exposure; this one says: {}", text.trim()),
        );
        return;
    }
    assert!(
        out.status.success(),
        "{UNIT} is over an exposure of 2.0:\n{text}"
    );
}

#[test]
fn unit_sysusers_tmpfiles_and_agent_toml_agree() {
    let unit = unit_settings(&read(&repo().join(UNIT)));
    let user = unit.get("User").expect("User=");
    let group = unit.get("Group").expect("Group=");
    assert_ne!(user, "root");
    assert_eq!(unit.get("Type").map(String::as_str), Some("notify"));
    assert_eq!(unit.get("NoNewPrivileges").map(String::as_str), Some("yes"));
    assert_eq!(
        unit.get("CapabilityBoundingSet").map(String::as_str),
        Some("")
    );

    // sysusers creates that user with that group.
    let sysusers = read(&repo().join("systemd/deploy-agent.sysusers"));
    let lines: Vec<Vec<&str>> = sysusers
        .lines()
        .filter(|l| !l.trim_start().starts_with('#') && !l.trim().is_empty())
        .map(|l| l.split_whitespace().collect())
        .collect();
    assert!(
        lines.iter().any(|l| l[..2] == ["g", group.as_str()]),
        "sysusers does not create group {group}"
    );
    assert!(
        lines
            .iter()
            .any(|l| l[..3] == ["u", user.as_str(), &format!("-:{group}")]),
        "sysusers does not create user {user} in group {group}"
    );

    // agent.toml: the socket is in the RuntimeDirectory, its group is the unit's group,
    // and every allowed root is writable in the sandbox.
    let agent: BTreeMap<String, String> = read(&repo().join("systemd/agent.toml"))
        .lines()
        .filter(|l| !l.trim_start().starts_with('#'))
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| (k.trim().to_owned(), v.trim().to_owned()))
        .collect();
    let runtime = unit.get("RuntimeDirectory").expect("RuntimeDirectory=");
    assert_eq!(
        agent["socket"],
        format!("\"/run/{runtime}/agent.sock\""),
        "agent.toml's socket is not in the unit's RuntimeDirectory"
    );
    assert_eq!(agent["socket_group"], format!("\"{group}\""));
    let writable: Vec<&str> = unit["ReadWritePaths"].split_whitespace().collect();
    for root in agent["allowed_roots"]
        .trim_matches(['[', ']'])
        .split(',')
        .map(|r| r.trim().trim_matches('"'))
    {
        assert!(
            writable.contains(&root),
            "allowed root {root} is not in ReadWritePaths={writable:?}"
        );
    }

    // tmpfiles gives deploy_to to the agent's user.
    let tmpfiles = read(&repo().join("systemd/deploy-agent.tmpfiles"));
    let first = tmpfiles
        .lines()
        .find(|l| l.starts_with("d "))
        .expect("a `d` line")
        .split_whitespace()
        .collect::<Vec<_>>();
    assert_eq!(first[3], user, "deploy_to must belong to {user}: {first:?}");
    assert!(
        writable.iter().any(|w| first[1].starts_with(w)),
        "{} is not under ReadWritePaths",
        first[1]
    );

    // The sudo drop-in resets every setting that would turn NoNewPrivileges back on.
    let sudo = unit_settings(&read(
        &repo().join("systemd/deploy-agent.service.d/allow-sudo.conf"),
    ));
    for implies_nnp in [
        "PrivateDevices",
        "ProtectKernelTunables",
        "ProtectKernelModules",
        "ProtectKernelLogs",
        "ProtectClock",
        "ProtectHostname",
        "LockPersonality",
        "MemoryDenyWriteExecute",
        "RestrictRealtime",
        "RestrictSUIDSGID",
        "RestrictNamespaces",
        "SystemCallArchitectures",
        "SystemCallFilter",
        "RestrictAddressFamilies",
    ] {
        if unit.contains_key(implies_nnp) {
            assert!(
                matches!(sudo.get(implies_nnp).map(String::as_str), Some("no" | "")),
                "allow-sudo.conf must reset {implies_nnp}= (it implies NoNewPrivileges=yes)"
            );
        }
    }
    assert_eq!(sudo.get("NoNewPrivileges").map(String::as_str), Some("no"));
}

#[test]
fn sysusers_and_tmpfiles_apply_to_a_scratch_root() {
    if !require(
        "systemd-sysusers",
        "applies systemd/deploy-agent.sysusers to a scratch root (apt-get install systemd)",
    ) {
        return;
    }
    let env = TestEnv::new();
    let root = env.mkdir("root");
    fs::create_dir_all(root.join("etc")).expect("mkdir etc");
    let out = Command::new("systemd-sysusers")
        .arg(format!("--root={}", root.display()))
        .arg(repo().join("systemd/deploy-agent.sysusers"))
        .output()
        .expect("run systemd-sysusers");
    assert!(
        out.status.success(),
        "systemd-sysusers: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let passwd = read(&root.join("etc/passwd"));
    let group = read(&root.join("etc/group"));
    let gid = group
        .lines()
        .find_map(|l| l.strip_prefix("deploy:x:")?.split(':').next())
        .expect("group deploy");
    let user = passwd
        .lines()
        .find(|l| l.starts_with("deploy-agent:"))
        .expect("user deploy-agent");
    let fields: Vec<&str> = user.split(':').collect();
    assert_eq!(fields[3], gid, "deploy-agent's group is deploy: {user}");
    assert_eq!(fields[5], "/var/lib/deploy-agent");

    if !require(
        "systemd-tmpfiles",
        "applies systemd/deploy-agent.tmpfiles to a scratch root (apt-get install systemd)",
    ) {
        return;
    }
    if fs::metadata(env.root()).expect("stat").uid() != 0
        && !missing(
            "root",
            "systemd-tmpfiles chowns /srv/myapp to deploy-agent (CI runs as root)",
        )
    {
        return;
    }
    // The example's app user.
    fs::write(
        root.join("etc/passwd"),
        format!("{passwd}myapp:x:4242:4242::/nonexistent:/usr/sbin/nologin\n"),
    )
    .expect("add myapp");
    let out = Command::new("systemd-tmpfiles")
        .arg(format!("--root={}", root.display()))
        .arg("--create")
        .arg(repo().join("systemd/deploy-agent.tmpfiles"))
        .output()
        .expect("run systemd-tmpfiles");
    assert!(
        out.status.success(),
        "systemd-tmpfiles: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let app = fs::metadata(root.join("srv/myapp")).expect("/srv/myapp created");
    assert_eq!(app.uid().to_string(), fields[2], "owned by deploy-agent");
    assert_eq!(app.mode() & 0o7777, 0o755);
    let env_file = fs::metadata(root.join("srv/myapp/shared/.env")).expect(".env created");
    assert_eq!(env_file.mode() & 0o7777, 0o640);
}

#[test]
fn sudoers_snippet_passes_visudo() {
    // See: #12
    if !require(
        "visudo",
        "checks systemd/sudoers.d/deploy-agent with `visudo -c` (apt-get install sudo)",
    ) {
        return;
    }
    let out = Command::new("visudo")
        .arg("-cf")
        .arg(repo().join("systemd/sudoers.d/deploy-agent"))
        .output()
        .expect("run visudo");
    assert!(
        out.status.success(),
        "visudo: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn shipped_agent_configs_are_accepted_by_the_real_agent() {
    for config in ["systemd/agent.toml", "examples/agent/agent.toml"] {
        let env = TestEnv::new();
        // Socket and root are moved into the temp dir by Agent's own flags; the group is
        // ours (a file we create gets our effective gid), since `deploy` may not exist.
        let probe = env.write("gid-probe", "");
        let gid = fs::metadata(&probe).expect("stat").gid().to_string();
        let path = repo().join(config);
        let agent = Agent::start_with(
            env.root(),
            &[
                "--config",
                path.to_str().expect("utf-8 path"),
                "--socket-group",
                &gid,
            ],
        );
        let mode = fs::metadata(&agent.socket).expect("socket").mode() & 0o777;
        assert_eq!(mode, 0o660, "{config}: socket mode");
    }
}

// ---------------------------------------------------------------------------------------
// The reference pages against the source
// ---------------------------------------------------------------------------------------

/// The quoted strings of `const NAME: ... = &[ ... ];` in a Rust source file.
fn const_strings(source: &str, name: &str) -> Vec<String> {
    let start = source
        .find(&format!("const {name}:"))
        .unwrap_or_else(|| panic!("const {name} not found"));
    let body = &source[start..];
    let end = body.find("];").expect("end of the const");
    body[..end]
        .split('"')
        .skip(1)
        .step_by(2)
        .map(str::to_owned)
        .collect()
}

/// The field names of `struct NAME { ... }` in a Rust source file.
fn struct_fields(source: &str, name: &str) -> Vec<String> {
    let start = source
        .find(&format!("struct {name} {{"))
        .unwrap_or_else(|| panic!("struct {name} not found"));
    let body = &source[start..];
    let body = &body[body.find('{').expect("{") + 1..body.find('}').expect("}")];
    body.lines()
        .map(str::trim)
        .filter(|l| !l.starts_with("//") && !l.starts_with('#'))
        .filter_map(|l| l.split_once(':').map(|(k, _)| k.trim().to_owned()))
        .filter(|k| !k.is_empty())
        .collect()
}

#[test]
fn configuration_reference_covers_every_key_and_variable() {
    let source = read(&repo().join("controller/src/config.rs"));
    let doc = read(&repo().join("docs/configuration.md"));
    let mut missing = Vec::new();
    // The keys are the fields of the structs serde reads the file into.
    for table in [
        "RawFile",
        "Layer",
        "ReleaseLayer",
        "HealthLayer",
        "RolloutLayer",
        "VerifyLayer",
        "ComposeLayer",
    ] {
        let keys = struct_fields(&source, table);
        assert!(keys.len() >= 3, "{table} parsed as {keys:?}");
        for k in keys {
            if !doc.contains(&format!("`{k}`")) {
                missing.push(format!("{table}: `{k}`"));
            }
        }
    }
    let overrides = const_strings(&source, "ENV_OVERRIDES");
    assert!(
        overrides.len() > 20,
        "ENV_OVERRIDES parsed as {overrides:?}"
    );
    for var in overrides.iter().filter(|s| s.starts_with("DEPLOYCTL_")) {
        if !doc.contains(&format!("`{var}`")) {
            missing.push(format!("ENV_OVERRIDES: `{var}`"));
        }
    }
    for var in ["DEPLOYCTL_SSH_KEY", "DEPLOYCTL_CONFIG"] {
        if !doc.contains(&format!("`{var}`")) {
            missing.push(format!("`{var}`"));
        }
    }
    assert!(
        missing.is_empty(),
        "docs/configuration.md does not mention:\n{}",
        missing.join("\n")
    );
}

#[test]
fn exit_code_reference_matches_the_source() {
    let source = read(&repo().join("controller/src/exit.rs"));
    let doc = read(&repo().join("docs/exit-codes.md"));
    let codes: Vec<u8> = source
        .lines()
        .filter_map(|l| l.trim().strip_prefix("pub const "))
        .filter_map(|l| l.split_once(": u8 = "))
        .filter_map(|(_, v)| v.trim_end_matches(';').parse().ok())
        .collect();
    assert!(codes.len() >= 6, "exit.rs parsed as {codes:?}");
    let rows: BTreeSet<u8> = doc
        .lines()
        .filter_map(|l| l.strip_prefix("| "))
        .filter_map(|l| l.split(' ').next()?.parse().ok())
        .collect();
    assert_eq!(
        rows,
        codes.iter().copied().collect::<BTreeSet<_>>(),
        "docs/exit-codes.md's table vs controller/src/exit.rs"
    );
}

#[test]
fn agent_config_keys_are_documented() {
    let source = read(&repo().join("agent/src/config.rs"));
    let start = source.find("struct FileConfig").expect("FileConfig");
    let body = &source[start..];
    let body = &body[body.find('{').expect("{") + 1..body.find('}').expect("}")];
    let keys: Vec<&str> = body
        .lines()
        .filter_map(|l| l.trim().split_once(':').map(|(k, _)| k.trim()))
        .collect();
    assert!(
        keys.contains(&"allowed_roots"),
        "FileConfig parsed as {keys:?}"
    );
    let setup = read(&repo().join("docs/agent-setup.md"));
    let toml = read(&repo().join("systemd/agent.toml"));
    for k in keys {
        assert!(
            setup.contains(&format!("`{k}`")),
            "docs/agent-setup.md lacks `{k}`"
        );
        assert!(toml.contains(k), "systemd/agent.toml lacks {k}");
    }
}

/// GitHub's anchor for a heading: lowercase, punctuation dropped, spaces to `-`.
fn slug(heading: &str) -> String {
    heading
        .trim()
        .chars()
        .filter_map(|c| match c {
            ' ' => Some('-'),
            c if c.is_alphanumeric() || c == '-' || c == '_' => Some(c.to_ascii_lowercase()),
            _ => None,
        })
        .collect()
}

fn anchors(markdown: &str) -> BTreeSet<String> {
    let mut seen: BTreeMap<String, usize> = BTreeMap::new();
    let mut out = BTreeSet::new();
    let mut in_code = false;
    for line in markdown.lines() {
        if line.trim_start().starts_with("```") {
            in_code = !in_code;
            continue;
        }
        if in_code {
            continue;
        }
        if let Some(h) = line.strip_prefix('#') {
            let s = slug(h.trim_start_matches('#'));
            let n = seen.entry(s.clone()).or_insert(0);
            out.insert(if *n == 0 {
                s.clone()
            } else {
                format!("{s}-{n}")
            });
            *n += 1;
        }
    }
    out
}

#[test]
fn docs_links_resolve() {
    let mut problems = Vec::new();
    for path in doc_files() {
        let text = read(&path);
        let dir = path.parent().expect("dir");
        for link in text.split("](").skip(1).filter_map(|s| s.split(')').next()) {
            if link.starts_with("http://") || link.starts_with("https://") {
                continue;
            }
            let (file, anchor) = match link.split_once('#') {
                Some((f, a)) => (f, Some(a)),
                None => (link, None),
            };
            let target = if file.is_empty() {
                path.clone()
            } else {
                dir.join(file)
            };
            if !target.exists() {
                problems.push(format!("{}: ({link}): no such file", rel(&path)));
                continue;
            }
            if let Some(anchor) = anchor
                && target.extension().is_some_and(|e| e == "md")
                && !anchors(&read(&target)).contains(anchor)
            {
                problems.push(format!("{}: ({link}): no such heading", rel(&path)));
            }
        }
    }
    assert!(problems.is_empty(), "{}", problems.join("\n"));
}

//! The OpenSSH client configuration (`~/.ssh/config`, or `ssh_config = "PATH"`), read the
//! way `ssh` reads it (OpenSSH's `readconf.c`) for the settings deployctl uses:
//! `HostName`, `User`, `Port`, `IdentityFile`, `UserKnownHostsFile` and `ProxyJump`.
//!
//! - A line is `Keyword args` or `Keyword=args`; keywords are case-insensitive; blank lines
//!   and `#` comments are skipped; an argument may be `"double"` or `'single'` quoted.
//! - `Host` takes several patterns with `*` / `?` wildcards and `!` negation (a matching
//!   negated pattern vetoes the block), matched case-insensitively against the host name
//!   as written in deploy.toml (the alias).
//! - `Match` understands `all`, `host` (the `HostName` known so far, else the alias),
//!   `originalhost`, `user` and `localuser`, each negatable with `!`. A block with any
//!   other criterion (`exec`, `localnetwork`, `tagged`, `canonical`, `final`, ...) never
//!   applies: deployctl never runs `Match exec` commands.
//! - The first value that applies wins, except `IdentityFile`, whose values add up.
//! - `Include` takes globs; a relative path is under `~/.ssh`. An included file's lines
//!   apply only where the `Include` line itself applies, as in OpenSSH. At most 16 levels.
//! - `ProxyCommand` is refused when it is what applies (deployctl runs no commands to
//!   connect; `ProxyJump` does the same job). `ProxyJump none` and `ProxyCommand none`
//!   mean no jump.
//! - Keywords deployctl does not use are skipped, whatever their value: OpenSSH stays their
//!   judge. The ones it uses are checked, and a malformed line is an error naming the file
//!   and the line.
//!
//! Parsing ([`SshConfig::parse`]) and lookup ([`SshConfig::lookup`]) are pure; only
//! [`load`] and `Include` touch the file system.

use std::collections::HashMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, OnceLock};

use super::known_hosts::{match_pattern, match_pattern_list};

/// `Include` nesting limit (OpenSSH's `READCONF_MAX_DEPTH`).
const MAX_DEPTH: usize = 16;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SshConfigError {
    /// A line that cannot be used.
    #[error("{file}:{line}: {message}")]
    Line {
        file: String,
        line: usize,
        message: String,
    },
    #[error("cannot read the ssh config {file}: {message}")]
    Read { file: String, message: String },
}

/// Where a directive was written.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct At {
    pub file: Arc<str>,
    pub line: usize,
}

impl At {
    fn error(&self, message: impl Into<String>) -> SshConfigError {
        SshConfigError::Line {
            file: self.file.to_string(),
            line: self.line,
            message: message.into(),
        }
    }
}

impl fmt::Display for At {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.file, self.line)
    }
}

/// One hop of a `ProxyJump` / `proxy_jump`: `[user@]host[:port]` or
/// `ssh://[user@]host[:port]`, IPv6 addresses in brackets.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Jump {
    pub user: Option<String>,
    pub host: String,
    pub port: Option<u16>,
}

impl fmt::Display for Jump {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if let Some(u) = &self.user {
            write!(f, "{u}@")?;
        }
        if self.host.contains(':') {
            write!(f, "[{}]", self.host)?;
        } else {
            f.write_str(&self.host)?;
        }
        if let Some(p) = self.port {
            write!(f, ":{p}")?;
        }
        Ok(())
    }
}

/// Parses a jump list: hops separated by commas, or `none` (an empty list: no jump).
pub fn parse_jumps(s: &str) -> Result<Vec<Jump>, String> {
    let s = s.trim();
    if s.eq_ignore_ascii_case("none") {
        return Ok(Vec::new());
    }
    if s.is_empty() {
        return Err("empty jump host list (write `none` for no jump host)".into());
    }
    s.split(',').map(|hop| parse_jump(hop.trim())).collect()
}

fn parse_jump(s: &str) -> Result<Jump, String> {
    let spec = s;
    let s = match s.strip_prefix("ssh://") {
        Some(rest) => rest.strip_suffix('/').unwrap_or(rest),
        None => s,
    };
    if s.is_empty() {
        return Err("empty jump host".into());
    }
    if s.chars()
        .any(|c| c.is_whitespace() || c.is_control() || c == '/')
    {
        return Err(format!("bad jump host `{spec}`"));
    }
    let (user, rest) = match s.rsplit_once('@') {
        Some((u, r)) if !u.is_empty() => (Some(u.to_owned()), r),
        Some(_) => return Err(format!("bad jump host `{spec}`: empty user before `@`")),
        None => (None, s),
    };
    let (host, port) = if let Some(inner) = rest.strip_prefix('[') {
        let (addr, after) = inner
            .split_once(']')
            .ok_or_else(|| format!("bad jump host `{spec}`: missing `]`"))?;
        let port =
            match after {
                "" => None,
                _ => Some(after.strip_prefix(':').ok_or_else(|| {
                    format!("bad jump host `{spec}`: expected `:PORT` after `]`")
                })?),
            };
        (addr, port)
    } else if rest.matches(':').count() > 1 {
        return Err(format!(
            "bad jump host `{spec}`: IPv6 addresses need brackets, e.g. `[::1]:2222`"
        ));
    } else {
        match rest.split_once(':') {
            Some((h, p)) => (h, Some(p)),
            None => (rest, None),
        }
    };
    if host.is_empty() {
        return Err(format!("bad jump host `{spec}`: no host name"));
    }
    let port = port
        .map(|p| match p.parse::<u16>() {
            Ok(n) if n > 0 => Ok(n),
            _ => Err(format!(
                "bad jump host `{spec}`: bad port `{p}` (expected 1-65535)"
            )),
        })
        .transpose()?;
    Ok(Jump {
        user,
        host: host.to_owned(),
        port,
    })
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Keyword {
    HostName,
    User,
    Port,
    IdentityFile,
    UserKnownHostsFile,
    ProxyJump,
    ProxyCommand,
}

#[derive(Debug)]
enum Cond {
    /// `Host` patterns, `!` kept.
    Host(Vec<String>),
    /// Every criterion must hold.
    Match(Vec<Criterion>),
}

#[derive(Debug)]
struct Criterion {
    negated: bool,
    kind: Test,
}

#[derive(Debug)]
enum Test {
    All,
    Host(String),
    OriginalHost(String),
    User(String),
    LocalUser(String),
    /// `exec`, `localnetwork`, ...: the block never applies.
    Unsupported,
}

#[derive(Debug)]
struct Directive {
    keyword: Keyword,
    args: Vec<String>,
    at: At,
    /// All must hold: the enclosing `Host`/`Match` of each `Include` level.
    conds: Vec<Arc<Cond>>,
}

/// A parsed client config: its directives in file order, `Include`s expanded.
#[derive(Debug, Default)]
pub struct SshConfig {
    directives: Vec<Directive>,
}

/// What a lookup is about.
#[derive(Debug, Clone, Copy)]
pub struct Query<'a> {
    /// The host as written (the alias), e.g. `web-1`.
    pub host: &'a str,
    /// The login already decided (`user@` in the host string, or deploy.toml's `user`),
    /// which `Match user` sees.
    pub user: Option<&'a str>,
    /// The local user name (`Match localuser`, `%u`).
    pub local_user: &'a str,
}

/// `ProxyJump` / `ProxyCommand`, whichever applied first.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Proxy {
    /// `ProxyJump` hops, empty for `none` (or `ProxyCommand none`).
    Jump(Vec<Jump>, At),
    /// A `ProxyCommand` other than `none`: not supported.
    Command(At),
}

/// The settings that apply to one host. `None`/empty: the config says nothing.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct HostConfig {
    /// `HostName`, `%h` expanded.
    pub hostname: Option<String>,
    pub user: Option<String>,
    pub port: Option<u16>,
    /// `IdentityFile`s as written (expand with [`expand_path`]), in order.
    pub identity_files: Vec<(String, At)>,
    /// `UserKnownHostsFile` as written.
    pub known_hosts: Option<(Vec<String>, At)>,
    pub proxy: Option<Proxy>,
}

impl SshConfig {
    /// Parses `text`, read from `file` (the name used in messages and for nothing else).
    /// `home` is where `~` and relative `Include`s point (`~/.ssh`).
    pub fn parse(text: &str, file: &str, home: Option<&Path>) -> Result<SshConfig, SshConfigError> {
        let mut out = Vec::new();
        parse_into(text, file, home, 0, &[], &mut out)?;
        Ok(SshConfig { directives: out })
    }

    /// Reads and parses `path`.
    pub fn read(path: &Path, home: Option<&Path>) -> Result<SshConfig, SshConfigError> {
        let text = std::fs::read_to_string(path).map_err(|e| SshConfigError::Read {
            file: path.display().to_string(),
            message: e.to_string(),
        })?;
        SshConfig::parse(&text, &path.display().to_string(), home)
    }

    /// The settings for `q.host`: for each keyword the first value whose blocks apply.
    pub fn lookup(&self, q: &Query<'_>) -> Result<HostConfig, SshConfigError> {
        let mut hc = HostConfig::default();
        for d in &self.directives {
            if !d
                .conds
                .iter()
                .all(|c| cond_holds(c, q, hc.hostname.as_deref(), hc.user.as_deref()))
            {
                continue;
            }
            let arg = d.args.first().map(String::as_str).unwrap_or_default();
            match d.keyword {
                Keyword::HostName if hc.hostname.is_none() => {
                    let name = expand_tokens(arg, &|c| match c {
                        'h' => Some(q.host.to_owned()),
                        _ => None,
                    })
                    .map_err(|m| d.at.error(format!("HostName: {m}")))?;
                    hc.hostname = Some(name);
                }
                Keyword::User if hc.user.is_none() => hc.user = Some(arg.to_owned()),
                Keyword::Port if hc.port.is_none() => {
                    hc.port = Some(arg.parse().map_err(|_| d.at.error("bad Port"))?)
                }
                Keyword::IdentityFile => hc.identity_files.push((arg.to_owned(), d.at.clone())),
                Keyword::UserKnownHostsFile if hc.known_hosts.is_none() => {
                    hc.known_hosts = Some((d.args.clone(), d.at.clone()))
                }
                Keyword::ProxyJump if hc.proxy.is_none() => {
                    let hops =
                        parse_jumps(arg).map_err(|m| d.at.error(format!("ProxyJump: {m}")))?;
                    hc.proxy = Some(Proxy::Jump(hops, d.at.clone()));
                }
                Keyword::ProxyCommand if hc.proxy.is_none() => {
                    hc.proxy = Some(if d.args.len() == 1 && arg.eq_ignore_ascii_case("none") {
                        Proxy::Jump(Vec::new(), d.at.clone())
                    } else {
                        Proxy::Command(d.at.clone())
                    });
                }
                _ => {}
            }
        }
        Ok(hc)
    }
}

fn cond_holds(c: &Cond, q: &Query<'_>, hostname: Option<&str>, cfg_user: Option<&str>) -> bool {
    match c {
        Cond::Host(patterns) => {
            let host = q.host.to_ascii_lowercase();
            let mut positive = false;
            for p in patterns {
                let (negated, body) = match p.strip_prefix('!') {
                    Some(b) => (true, b),
                    None => (false, p.as_str()),
                };
                if match_pattern(host.as_bytes(), body.to_ascii_lowercase().as_bytes()) {
                    if negated {
                        return false;
                    }
                    positive = true;
                }
            }
            positive
        }
        Cond::Match(criteria) => criteria.iter().all(|c| {
            let lower = |s: &str| s.to_ascii_lowercase();
            let holds = match &c.kind {
                Test::Unsupported => return false,
                Test::All => true,
                Test::Host(list) => {
                    let h = lower(hostname.unwrap_or(q.host));
                    match_pattern_list(h.as_bytes(), list.as_bytes())
                }
                Test::OriginalHost(list) => {
                    match_pattern_list(lower(q.host).as_bytes(), list.as_bytes())
                }
                // User names are matched as they are (OpenSSH: dolower = 0); the list is
                // lowercased by the shared matcher, so compare lowercase both sides.
                Test::User(list) => {
                    let u = lower(q.user.or(cfg_user).unwrap_or(q.local_user));
                    match_pattern_list(u.as_bytes(), list.as_bytes())
                }
                Test::LocalUser(list) => {
                    match_pattern_list(lower(q.local_user).as_bytes(), list.as_bytes())
                }
            };
            holds != c.negated
        }),
    }
}

fn parse_into(
    text: &str,
    file: &str,
    home: Option<&Path>,
    depth: usize,
    outer: &[Arc<Cond>],
    out: &mut Vec<Directive>,
) -> Result<(), SshConfigError> {
    let file: Arc<str> = Arc::from(file);
    let mut conds: Vec<Arc<Cond>> = outer.to_vec();
    for (i, raw) in text.lines().enumerate() {
        let at = At {
            file: file.clone(),
            line: i + 1,
        };
        let Some((keyword, args)) = split_line(raw).map_err(|m| at.error(m))? else {
            continue;
        };
        let lower = keyword.to_ascii_lowercase();
        let one = |what: &str| -> Result<(), SshConfigError> {
            match args.len() {
                0 => Err(at.error(format!("{keyword} needs {what}"))),
                1 if args[0].is_empty() => Err(at.error(format!("{keyword} needs {what}"))),
                1 => Ok(()),
                _ => Err(at.error(format!(
                    "{keyword} takes one argument, got {}: {}",
                    args.len(),
                    args.join(" ")
                ))),
            }
        };
        let keyword_kind = match lower.as_str() {
            "host" => {
                if args.is_empty() {
                    return Err(at.error("Host needs at least one pattern"));
                }
                conds = outer.to_vec();
                conds.push(Arc::new(Cond::Host(args)));
                continue;
            }
            "match" => {
                let criteria = parse_match(&args).map_err(|m| at.error(m))?;
                conds = outer.to_vec();
                conds.push(Arc::new(Cond::Match(criteria)));
                continue;
            }
            "include" => {
                if args.is_empty() {
                    return Err(at.error("Include needs a file name"));
                }
                if depth + 1 > MAX_DEPTH {
                    return Err(at.error(format!(
                        "Include nested more than {MAX_DEPTH} levels deep (a loop?)"
                    )));
                }
                for pattern in &args {
                    for path in include_paths(pattern, home).map_err(|m| at.error(m))? {
                        let text = std::fs::read_to_string(&path)
                            .map_err(|e| at.error(format!("Include {}: {e}", path.display())))?;
                        parse_into(
                            &text,
                            &path.display().to_string(),
                            home,
                            depth + 1,
                            &conds,
                            out,
                        )?;
                    }
                }
                continue;
            }
            "hostname" => {
                one("a host name")?;
                Keyword::HostName
            }
            "user" => {
                one("a user name")?;
                Keyword::User
            }
            "port" => {
                one("a port number")?;
                match args[0].parse::<u16>() {
                    Ok(p) if p > 0 => {}
                    _ => {
                        return Err(at.error(format!("bad Port `{}` (expected 1-65535)", args[0])));
                    }
                }
                Keyword::Port
            }
            "identityfile" => {
                one("a file name")?;
                Keyword::IdentityFile
            }
            "userknownhostsfile" => {
                if args.is_empty() {
                    return Err(at.error("UserKnownHostsFile needs a file name"));
                }
                Keyword::UserKnownHostsFile
            }
            "proxyjump" => {
                one("a jump host or `none`")?;
                parse_jumps(&args[0]).map_err(|m| at.error(format!("ProxyJump: {m}")))?;
                Keyword::ProxyJump
            }
            "proxycommand" => {
                if args.is_empty() {
                    return Err(at.error("ProxyCommand needs a command or `none`"));
                }
                Keyword::ProxyCommand
            }
            _ => continue,
        };
        out.push(Directive {
            keyword: keyword_kind,
            args,
            at,
            conds: conds.clone(),
        });
    }
    Ok(())
}

fn parse_match(args: &[String]) -> Result<Vec<Criterion>, String> {
    if args.is_empty() {
        return Err("Match needs criteria (e.g. `Match host NAME` or `Match all`)".into());
    }
    let mut out = Vec::new();
    let mut it = args.iter();
    while let Some(word) = it.next() {
        let (negated, name) = match word.strip_prefix('!') {
            Some(n) => (true, n),
            None => (false, word.as_str()),
        };
        let name = name.to_ascii_lowercase();
        let mut value = || {
            it.next()
                .cloned()
                .ok_or_else(|| format!("Match {name} needs an argument"))
        };
        let kind = match name.as_str() {
            "all" => Test::All,
            "canonical" | "final" => Test::Unsupported,
            "host" => Test::Host(value()?),
            "originalhost" => Test::OriginalHost(value()?),
            "user" => Test::User(value()?),
            "localuser" => Test::LocalUser(value()?),
            "exec" | "localnetwork" | "tagged" | "version" | "sessiontype" | "command" => {
                value()?;
                Test::Unsupported
            }
            other => return Err(format!("unknown Match criterion `{other}`")),
        };
        out.push(Criterion { negated, kind });
    }
    Ok(out)
}

/// Splits a line into its keyword and arguments, or `None` for a blank or comment line.
fn split_line(line: &str) -> Result<Option<(String, Vec<String>)>, String> {
    let s = line.trim();
    if s.is_empty() || s.starts_with('#') {
        return Ok(None);
    }
    let end = s
        .find(|c: char| c.is_whitespace() || c == '=')
        .unwrap_or(s.len());
    let keyword = s[..end].to_owned();
    let mut rest = s[end..].trim_start();
    if let Some(r) = rest.strip_prefix('=') {
        rest = r.trim_start();
    }
    if keyword.is_empty() {
        return Err(format!("no keyword before `=` in `{s}`"));
    }
    Ok(Some((keyword, tokenize(rest)?)))
}

/// Whitespace-separated words; quotes group, a backslash escapes a quote, a space or
/// itself; an unquoted `#` starting a word ends the line.
fn tokenize(s: &str) -> Result<Vec<String>, String> {
    let mut args = Vec::new();
    let mut chars = s.chars().peekable();
    loop {
        while chars.peek().is_some_and(|c| c.is_whitespace()) {
            chars.next();
        }
        match chars.peek() {
            None | Some('#') => break,
            Some(_) => {}
        }
        let mut word = String::new();
        while let Some(&c) = chars.peek() {
            if c.is_whitespace() {
                break;
            }
            chars.next();
            match c {
                '"' | '\'' => loop {
                    match chars.next() {
                        None => return Err(format!("unterminated {c} quote")),
                        Some(x) if x == c => break,
                        Some('\\') if chars.peek() == Some(&c) => word.push(c),
                        Some(x) => word.push(x),
                    }
                },
                '\\' => match chars.peek() {
                    Some(&x) if x == '"' || x == '\'' || x == '\\' || x == ' ' => {
                        word.push(x);
                        chars.next();
                    }
                    _ => word.push('\\'),
                },
                _ => word.push(c),
            }
        }
        args.push(word);
    }
    Ok(args)
}

/// The files an `Include` argument names, sorted, as `glob(3)` would list them. A pattern
/// that matches nothing is not an error (OpenSSH ignores it too).
fn include_paths(pattern: &str, home: Option<&Path>) -> Result<Vec<PathBuf>, String> {
    let full = if let Some(rest) = pattern.strip_prefix("~/") {
        let home = home.ok_or("Include: `~` needs HOME")?;
        home.join(rest)
    } else if pattern.starts_with('/') {
        PathBuf::from(pattern)
    } else if pattern.starts_with('~') {
        return Err(format!(
            "Include {pattern}: only `~/` is supported, not `~user/`"
        ));
    } else {
        let home = home.ok_or("Include: a relative path is under ~/.ssh, which needs HOME")?;
        home.join(".ssh").join(pattern)
    };
    let mut found = vec![PathBuf::from("/")];
    for comp in full.components().skip(1) {
        let part = comp.as_os_str().to_string_lossy();
        let mut next = Vec::new();
        for dir in &found {
            if !part.contains(['*', '?']) {
                let p = dir.join(&*part);
                if p.exists() {
                    next.push(p);
                }
                continue;
            }
            let Ok(entries) = std::fs::read_dir(dir) else {
                continue;
            };
            let mut names: Vec<String> = entries
                .filter_map(|e| e.ok())
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| {
                    // As glob(3): a wildcard never matches a leading dot.
                    (part.starts_with('.') || !n.starts_with('.'))
                        && match_pattern(n.as_bytes(), part.as_bytes())
                })
                .collect();
            names.sort();
            next.extend(names.into_iter().map(|n| dir.join(n)));
        }
        found = next;
    }
    Ok(found.into_iter().filter(|p| p.is_file()).collect())
}

/// OpenSSH's `percent_expand`: `%%` is `%`, `%X` what `token` says, and an unknown token
/// is an error.
pub fn expand_tokens(s: &str, token: &dyn Fn(char) -> Option<String>) -> Result<String, String> {
    let mut out = String::new();
    let mut chars = s.chars();
    while let Some(c) = chars.next() {
        if c != '%' {
            out.push(c);
            continue;
        }
        match chars.next() {
            Some('%') => out.push('%'),
            Some(t) => match token(t) {
                Some(v) => out.push_str(&v),
                None => return Err(format!("unknown token %{t} in `{s}`")),
            },
            None => return Err(format!("`%` at the end of `{s}`")),
        }
    }
    Ok(out)
}

/// The values `IdentityFile` and `UserKnownHostsFile` may refer to.
#[derive(Debug, Clone, Copy)]
pub struct PathTokens<'a> {
    pub home: Option<&'a Path>,
    pub local_user: &'a str,
    /// The host name connected to (`%h`, after `HostName`).
    pub hostname: &'a str,
    /// The host as written (`%n`).
    pub original: &'a str,
    pub user: &'a str,
    pub port: u16,
}

/// `~/` and the `%d %u %h %n %r %p %%` tokens of a path from the config.
pub fn expand_path(s: &str, t: &PathTokens<'_>, at: &At) -> Result<PathBuf, SshConfigError> {
    let home = || t.home.map(|h| h.display().to_string());
    let s = match s.strip_prefix("~/") {
        Some(rest) => match home() {
            Some(h) => format!("{h}/{rest}"),
            None => return Err(at.error(format!("`{s}`: `~` needs HOME"))),
        },
        None => s.to_owned(),
    };
    let expanded = expand_tokens(&s, &|c| match c {
        'd' => home(),
        'u' => Some(t.local_user.to_owned()),
        'h' => Some(t.hostname.to_owned()),
        'n' => Some(t.original.to_owned()),
        'r' => Some(t.user.to_owned()),
        'p' => Some(t.port.to_string()),
        _ => None,
    })
    .map_err(|m| at.error(m))?;
    Ok(PathBuf::from(expanded))
}

/// Which client config to read; see [`load`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Source {
    /// `~/.ssh/config`: read if it exists.
    Default(PathBuf),
    /// `ssh_config = "PATH"`: must exist.
    Given(PathBuf),
    /// `ssh_config = false`.
    Off,
}

/// The config named by `source`, parsed once per process (every host of a command looks
/// its settings up in the same parse). `None`: no config.
pub fn load(
    source: &Source,
    home: Option<&Path>,
) -> Result<Option<Arc<SshConfig>>, SshConfigError> {
    type Cache = Mutex<HashMap<PathBuf, Result<Arc<SshConfig>, SshConfigError>>>;
    static CACHE: OnceLock<Cache> = OnceLock::new();
    let path = match source {
        Source::Off => return Ok(None),
        Source::Default(p) if !p.exists() => return Ok(None),
        Source::Default(p) | Source::Given(p) => p,
    };
    let cache = CACHE.get_or_init(Default::default);
    let mut cache = cache.lock().unwrap_or_else(|p| p.into_inner());
    cache
        .entry(path.clone())
        .or_insert_with(|| SshConfig::read(path, home).map(Arc::new))
        .clone()
        .map(Some)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> SshConfig {
        SshConfig::parse(text, "cfg", None).unwrap()
    }

    fn look(cfg: &SshConfig, host: &str) -> HostConfig {
        cfg.lookup(&Query {
            host,
            user: None,
            local_user: "me",
        })
        .unwrap()
    }

    fn err(text: &str) -> String {
        SshConfig::parse(text, "cfg", None).unwrap_err().to_string()
    }

    #[test]
    fn host_blocks_first_value_wins() {
        let cfg = parse(
            "# comment\n\
             Host web-1 web-2\n\
             \tHostName %h.internal\n\
             \tUser deploy\n\
             Host web-*\n\
             \tUser other\n\
             \tPort 2222\n\
             Host *\n\
             \tPort 22\n\
             \tUser fallback\n",
        );
        let w1 = look(&cfg, "web-1");
        assert_eq!(w1.hostname.as_deref(), Some("web-1.internal"));
        assert_eq!(w1.user.as_deref(), Some("deploy"));
        assert_eq!(w1.port, Some(2222));
        let w3 = look(&cfg, "WEB-3");
        assert_eq!(w3.hostname, None);
        assert_eq!(w3.user.as_deref(), Some("other"));
        let db = look(&cfg, "db");
        assert_eq!((db.user.as_deref(), db.port), (Some("fallback"), Some(22)));
    }

    #[test]
    fn wildcards_and_negation() {
        let cfg = parse(
            "Host *.example.com !bastion.example.com\n  ProxyJump bastion.example.com\n\
             Host db?\n  Port 5\n",
        );
        assert!(matches!(
            look(&cfg, "app.example.com").proxy,
            Some(Proxy::Jump(ref h, _)) if h[0].host == "bastion.example.com"
        ));
        assert_eq!(look(&cfg, "bastion.example.com").proxy, None);
        assert_eq!(look(&cfg, "db1").port, Some(5));
        assert_eq!(look(&cfg, "db12").port, None);
        assert_eq!(look(&cfg, "example.com").proxy, None);
    }

    #[test]
    fn equals_quotes_and_comments() {
        let cfg = parse(
            "Host=a\nPort=2200\nUser = \"the user\"\nIdentityFile \"~/.ssh/my key\" # mine\n\
             HOSTNAME 'a.example'\n",
        );
        let a = look(&cfg, "a");
        assert_eq!(a.port, Some(2200));
        assert_eq!(a.user.as_deref(), Some("the user"));
        assert_eq!(a.hostname.as_deref(), Some("a.example"));
        assert_eq!(a.identity_files[0].0, "~/.ssh/my key");
    }

    #[test]
    fn identity_files_add_up_and_known_hosts_first_wins() {
        let cfg = parse(
            "Host a\n IdentityFile ~/.ssh/a\n UserKnownHostsFile /k1 /k2\n\
             Host *\n IdentityFile ~/.ssh/b\n UserKnownHostsFile /k3\n",
        );
        let a = look(&cfg, "a");
        let files: Vec<&str> = a.identity_files.iter().map(|(f, _)| f.as_str()).collect();
        assert_eq!(files, ["~/.ssh/a", "~/.ssh/b"]);
        assert_eq!(a.known_hosts.unwrap().0, ["/k1", "/k2"]);
    }

    #[test]
    fn proxy_jump_several_hops_and_none() {
        let cfg = parse(
            "Host inner\n ProxyJump none\n\
             Host *\n ProxyJump alice@j1:2201,ssh://j2,bob@[::1]:7\n",
        );
        let Some(Proxy::Jump(hops, at)) = look(&cfg, "x").proxy else {
            panic!("no ProxyJump")
        };
        assert_eq!(at.line, 4);
        assert_eq!(
            hops,
            [
                Jump {
                    user: Some("alice".into()),
                    host: "j1".into(),
                    port: Some(2201)
                },
                Jump {
                    user: None,
                    host: "j2".into(),
                    port: None
                },
                Jump {
                    user: Some("bob".into()),
                    host: "::1".into(),
                    port: Some(7)
                },
            ]
        );
        assert_eq!(hops[2].to_string(), "bob@[::1]:7");
        assert!(matches!(look(&cfg, "inner").proxy, Some(Proxy::Jump(ref h, _)) if h.is_empty()));
    }

    #[test]
    fn proxy_command_is_reported_where_it_applies() {
        let cfg = parse("Host a\n ProxyCommand ssh -W %h:%p j\nHost *\n ProxyJump j\n");
        assert!(matches!(look(&cfg, "a").proxy, Some(Proxy::Command(ref at)) if at.line == 2));
        assert!(matches!(look(&cfg, "b").proxy, Some(Proxy::Jump(..))));
        let none = parse("Host a\n ProxyCommand none\nHost *\n ProxyJump j\n");
        assert!(matches!(look(&none, "a").proxy, Some(Proxy::Jump(ref h, _)) if h.is_empty()));
    }

    #[test]
    fn match_blocks() {
        let cfg = parse(
            "Match exec \"true\"\n  Port 1\n\
             Match host *.internal user deploy\n  Port 2\n\
             Match originalhost short !localuser root\n  HostName short.internal\n\
             Match host short.internal\n  User deploy\n\
             Match all\n  Port 3\n",
        );
        // `exec` never applies; `host` sees the HostName set above it.
        let s = look(&cfg, "short");
        assert_eq!(s.hostname.as_deref(), Some("short.internal"));
        assert_eq!(s.user.as_deref(), Some("deploy"));
        assert_eq!(
            s.port,
            Some(3),
            "Match user saw no user yet when Port 2 was read"
        );
        let q = Query {
            host: "a.internal",
            user: Some("deploy"),
            local_user: "me",
        };
        assert_eq!(cfg.lookup(&q).unwrap().port, Some(2));
        assert_eq!(look(&cfg, "other").port, Some(3));
    }

    #[test]
    fn unknown_keywords_are_skipped_used_ones_checked() {
        let cfg = parse("Host a\n ServerAliveInterval 5\n ForwardAgent yes\n Port 7\n");
        assert_eq!(look(&cfg, "a").port, Some(7));
        assert_eq!(
            err("Host a\n Port seven\n"),
            "cfg:2: bad Port `seven` (expected 1-65535)"
        );
        assert_eq!(err("Host\n"), "cfg:1: Host needs at least one pattern");
        assert_eq!(err("\n\nUser \"deploy\n"), "cfg:3: unterminated \" quote");
        assert!(err("HostName a b\n").starts_with("cfg:1: HostName takes one argument"));
        assert!(err("Match nosuch x\n").contains("unknown Match criterion `nosuch`"));
        assert!(err("Match host\n").contains("Match host needs an argument"));
        assert!(err("ProxyJump a,,b\n").starts_with("cfg:1: ProxyJump: "));
        assert!(err("ProxyJump [::1\n").contains("missing `]`"));
        assert!(err("Port 0\n").contains("bad Port"));
    }

    #[test]
    fn bad_tokens_fail_at_lookup_naming_the_line() {
        let cfg = parse("Host a\n HostName %x.example\n");
        let e = cfg
            .lookup(&Query {
                host: "a",
                user: None,
                local_user: "me",
            })
            .unwrap_err();
        assert_eq!(
            e.to_string(),
            "cfg:2: HostName: unknown token %x in `%x.example`"
        );
    }

    #[test]
    fn path_tokens() {
        let at = At {
            file: "cfg".into(),
            line: 1,
        };
        let t = PathTokens {
            home: Some(Path::new("/home/me")),
            local_user: "me",
            hostname: "web.internal",
            original: "web",
            user: "deploy",
            port: 2222,
        };
        assert_eq!(
            expand_path("~/.ssh/%r@%h:%p-%n-%u-%%", &t, &at).unwrap(),
            PathBuf::from("/home/me/.ssh/deploy@web.internal:2222-web-me-%")
        );
        assert_eq!(
            expand_path("%d/k", &t, &at).unwrap(),
            PathBuf::from("/home/me/k")
        );
        assert!(expand_path("%z", &t, &at).is_err());
    }

    #[test]
    fn includes_apply_where_the_include_line_applies() {
        let home = tempfile::tempdir().unwrap();
        let ssh = home.path().join(".ssh");
        std::fs::create_dir_all(ssh.join("conf.d")).unwrap();
        std::fs::write(ssh.join("conf.d/10-a"), "Port 10\nHost b\n User bee\n").unwrap();
        std::fs::write(ssh.join("conf.d/20-b"), "Host a b\n HostName %h.twenty\n").unwrap();
        std::fs::write(ssh.join("conf.d/.hidden"), "Port 99\n").unwrap();
        std::fs::write(ssh.join("top"), "User top\n").unwrap();
        let text = "Include top\nHost a b\n  Include conf.d/*\nHost c\n  Include ~/.ssh/missing*\n";
        let cfg = SshConfig::parse(text, "main", Some(home.path())).unwrap();
        let a = look(&cfg, "a");
        assert_eq!(a.user.as_deref(), Some("top"));
        assert_eq!(a.port, Some(10));
        assert_eq!(a.hostname.as_deref(), Some("a.twenty"));
        let b = look(&cfg, "b");
        assert_eq!(b.port, Some(10));
        assert_eq!(b.hostname.as_deref(), Some("b.twenty"));
        // Not under `Host a b`: nothing from conf.d applies, even its own `Host b`.
        let c = look(&cfg, "c");
        assert_eq!((c.port, c.hostname), (None, None));
        // An error in an included file names that file.
        std::fs::write(ssh.join("bad"), "\nPort x\n").unwrap();
        let e = SshConfig::parse("Include bad\n", "main", Some(home.path()))
            .unwrap_err()
            .to_string();
        assert_eq!(
            e,
            format!(
                "{}:2: bad Port `x` (expected 1-65535)",
                ssh.join("bad").display()
            )
        );
        // A loop ends at the depth limit.
        std::fs::write(ssh.join("loop"), "Include loop\n").unwrap();
        let e = SshConfig::parse("Include loop\n", "main", Some(home.path()))
            .unwrap_err()
            .to_string();
        assert!(e.contains("nested more than 16"), "{e}");
    }

    #[test]
    fn jump_specs() {
        assert_eq!(parse_jumps("none").unwrap(), []);
        assert_eq!(
            parse_jumps("u@h:22, h2").unwrap()[1],
            Jump {
                user: None,
                host: "h2".into(),
                port: None
            }
        );
        for bad in ["", "u@", "@h", "h:0", "h:x", "::1", "a b", "h,"] {
            assert!(parse_jumps(bad).is_err(), "{bad}");
        }
    }
}

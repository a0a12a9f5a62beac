//! From a host as deploy.toml names it to an [`SshTarget`]: the name and port to connect
//! to, the login, the known_hosts files and keys, and the jump hosts in front of it.
//!
//! Precedence, for the target and for each jump host (the first found wins):
//!
//! - name: `HostName` from the ssh config (with `%h`), else the name as written;
//! - port: `:PORT` in the host string (or jump spec), else the config's `Port`, else 22
//!   (a written `:22` counts as no port: the host list does not keep the difference);
//! - user: `user@` in the host string (or jump spec), then, for targets only, `user` set
//!   in deploy.toml or `DEPLOYCTL_USER`, then the config's `User`, then `user`'s default
//!   (`$USER`);
//! - known_hosts: `known_hosts` set in deploy.toml, else the config's
//!   `UserKnownHostsFile`, else `~/.ssh/known_hosts`;
//! - keys: `DEPLOYCTL_SSH_KEY` or `ssh_key`, else the config's `IdentityFile`s (after
//!   ssh-agent), else ssh-agent and `~/.ssh/id_*`;
//! - jump hosts: `proxy_jump` in deploy.toml, else the config's `ProxyJump`. As with
//!   `ssh -J`, the first jump host's own `ProxyJump` puts more hops in front of it; the
//!   later ones' are not used.
//!
//! What deploy.toml says explicitly wins because it is written for this app's servers,
//! while `~/.ssh/config` is the operator's general setup; where deploy.toml is silent the
//! config fills in, as it does for `ssh`.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use super::SshTarget;
use super::config::{
    HostConfig, Jump, PathTokens, Proxy, Query, SshConfig, SshConfigError, expand_path,
};
use super::keys::{self, KeySource};

/// More than this many jump hosts in front of a host is taken for a `ProxyJump` loop.
const MAX_HOPS: usize = 16;

/// What a route is resolved from, shared by every host of an environment.
#[derive(Debug, Clone)]
pub struct Context<'a> {
    pub config: Option<&'a SshConfig>,
    /// deploy.toml's `user` (its default when not set).
    pub user: &'a str,
    /// `user` was set in deploy.toml or by `DEPLOYCTL_USER`.
    pub user_set: bool,
    pub known_hosts: &'a Path,
    /// `known_hosts` was set in deploy.toml or by `DEPLOYCTL_KNOWN_HOSTS`.
    pub known_hosts_set: bool,
    pub keys: Arc<Vec<KeySource>>,
    /// The keys came from `DEPLOYCTL_SSH_KEY` or `ssh_key`.
    pub keys_set: bool,
    /// deploy.toml's `proxy_jump`, `Some(empty)` for `none`.
    pub proxy_jump: Option<&'a [Jump]>,
    pub home: Option<&'a Path>,
    pub local_user: &'a str,
    pub auth_sock: Option<PathBuf>,
}

/// The route to `host` (as written, e.g. `web-1` or `10.0.0.5`); `user` and `port` are
/// the ones in the host string, `display` the name used in messages.
pub fn resolve(
    ctx: &Context<'_>,
    host: &str,
    user: Option<&str>,
    port: Option<u16>,
    display: &str,
) -> Result<SshTarget, SshConfigError> {
    let user = user.or(ctx.user_set.then_some(ctx.user));
    let (mut target, hc) = hop(ctx, host, user, port, display.to_owned())?;
    let jumps = match ctx.proxy_jump {
        Some(j) => j.to_vec(),
        None => proxy_hops(&hc)?,
    };
    target.jumps = chain(ctx, &jumps, display, 0)?;
    Ok(target)
}

/// The jump hosts for `jumps`, with the first one's own `ProxyJump` in front.
fn chain(
    ctx: &Context<'_>,
    jumps: &[Jump],
    target: &str,
    depth: usize,
) -> Result<Vec<SshTarget>, SshConfigError> {
    let Some((first, rest)) = jumps.split_first() else {
        return Ok(Vec::new());
    };
    let mut out = Vec::new();
    let (first_hop, hc) = hop_for(ctx, first, target)?;
    let before = proxy_hops(&hc)?;
    if !before.is_empty() {
        if depth + jumps.len() + before.len() > MAX_HOPS {
            return Err(SshConfigError::Read {
                file: "ProxyJump".into(),
                message: format!(
                    "more than {MAX_HOPS} jump hosts in front of {target}: do the ProxyJump \
                     settings of the jump hosts point at each other?"
                ),
            });
        }
        out = chain(ctx, &before, target, depth + 1)?;
    }
    out.push(first_hop);
    for j in rest {
        out.push(hop_for(ctx, j, target)?.0);
    }
    Ok(out)
}

fn hop_for(
    ctx: &Context<'_>,
    j: &Jump,
    target: &str,
) -> Result<(SshTarget, HostConfig), SshConfigError> {
    hop(
        ctx,
        &j.host,
        j.user.as_deref(),
        j.port,
        format!("{target} via jump host {j}"),
    )
}

fn proxy_hops(hc: &HostConfig) -> Result<Vec<Jump>, SshConfigError> {
    match &hc.proxy {
        None => Ok(Vec::new()),
        Some(Proxy::Jump(hops, _)) => Ok(hops.clone()),
        Some(Proxy::Command(at)) => Err(SshConfigError::Line {
            file: at.file.to_string(),
            line: at.line,
            message: "ProxyCommand is not supported by deployctl (it runs no local commands \
                      to connect): use ProxyJump, or set proxy_jump in deploy.toml (\"none\" \
                      to connect directly), or ssh_config = false"
                .into(),
        }),
    }
}

/// One host's settings, without its jumps.
fn hop(
    ctx: &Context<'_>,
    name: &str,
    user: Option<&str>,
    port: Option<u16>,
    display: String,
) -> Result<(SshTarget, HostConfig), SshConfigError> {
    let hc = match ctx.config {
        Some(cfg) => cfg.lookup(&Query {
            host: name,
            user,
            local_user: ctx.local_user,
        })?,
        None => HostConfig::default(),
    };
    let hostname = hc.hostname.clone().unwrap_or_else(|| name.to_owned());
    let port = port.or(hc.port).unwrap_or(22);
    let user = user
        .map(str::to_owned)
        .or_else(|| hc.user.clone())
        .unwrap_or_else(|| ctx.user.to_owned());
    let tokens = PathTokens {
        home: ctx.home,
        local_user: ctx.local_user,
        hostname: &hostname,
        original: name,
        user: &user,
        port,
    };
    let known_hosts = match &hc.known_hosts {
        Some((files, at)) if !ctx.known_hosts_set => {
            if files.len() == 1 && files[0].eq_ignore_ascii_case("none") {
                Vec::new()
            } else {
                files
                    .iter()
                    .map(|f| expand_path(f, &tokens, at))
                    .collect::<Result<_, _>>()?
            }
        }
        _ => vec![ctx.known_hosts.to_path_buf()],
    };
    let keys = if ctx.keys_set || hc.identity_files.is_empty() {
        ctx.keys.clone()
    } else {
        let files: Vec<PathBuf> = hc
            .identity_files
            .iter()
            .filter(|(f, _)| !f.eq_ignore_ascii_case("none"))
            .map(|(f, at)| expand_path(f, &tokens, at))
            .collect::<Result<_, _>>()?;
        Arc::new(keys::from_identity_files(&files, ctx.auth_sock.clone()))
    };
    Ok((
        SshTarget {
            host: hostname,
            port,
            user,
            display,
            known_hosts,
            keys,
            jumps: Vec::new(),
        },
        hc,
    ))
}

#[cfg(test)]
mod tests {
    use super::super::config::parse_jumps;
    use super::*;

    fn ctx<'a>(cfg: Option<&'a SshConfig>, jumps: Option<&'a [Jump]>) -> Context<'a> {
        Context {
            config: cfg,
            user: "me",
            user_set: false,
            known_hosts: Path::new("/home/me/.ssh/known_hosts"),
            known_hosts_set: false,
            keys: Arc::new(Vec::new()),
            keys_set: false,
            proxy_jump: jumps,
            home: Some(Path::new("/home/me")),
            local_user: "me",
            auth_sock: None,
        }
    }

    const CFG: &str = "Host web\n HostName 10.0.0.5\n User deploy\n Port 2222\n \
                       ProxyJump bastion\n UserKnownHostsFile ~/.ssh/kh_%h\n\
                       Host bastion\n HostName b.example\n User jump\n ProxyJump outer:2200\n\
                       Host outer\n User o\n";

    #[test]
    fn the_config_fills_in_and_explicit_values_win() {
        let cfg = SshConfig::parse(CFG, "cfg", None).unwrap();
        let c = ctx(Some(&cfg), None);
        let t = resolve(&c, "web", None, None, "web").unwrap();
        assert_eq!(
            (t.host.as_str(), t.port, t.user.as_str()),
            ("10.0.0.5", 2222, "deploy")
        );
        assert_eq!(t.known_hosts, [PathBuf::from("/home/me/.ssh/kh_10.0.0.5")]);
        // bastion's own ProxyJump goes in front of it.
        let hops: Vec<String> = t
            .jumps
            .iter()
            .map(|j| format!("{}@{}:{}", j.user, j.host, j.port))
            .collect();
        assert_eq!(hops, ["o@outer:2200", "jump@b.example:22"]);
        assert_eq!(t.jumps[1].display, "web via jump host bastion");
        // user@ and :port in the host string, and deploy.toml's user and known_hosts, win.
        let t = resolve(&c, "web", Some("root"), Some(22022), "root@web:22022").unwrap();
        assert_eq!((t.user.as_str(), t.port), ("root", 22022));
        let mut c2 = ctx(Some(&cfg), None);
        c2.user = "app";
        c2.user_set = true;
        c2.known_hosts_set = true;
        let t = resolve(&c2, "web", None, None, "web").unwrap();
        assert_eq!(t.user, "app");
        assert_eq!(t.known_hosts, [PathBuf::from("/home/me/.ssh/known_hosts")]);
        // ...but deploy.toml's user is not the jump hosts' login.
        assert_eq!(t.jumps[1].user, "jump");
    }

    #[test]
    fn proxy_jump_from_deploy_toml_wins_even_none() {
        let cfg = SshConfig::parse(CFG, "cfg", None).unwrap();
        let none = parse_jumps("none").unwrap();
        let t = resolve(&ctx(Some(&cfg), Some(&none)), "web", None, None, "web").unwrap();
        assert!(t.jumps.is_empty());
        let two = parse_jumps("a@j1:1,j2").unwrap();
        let t = resolve(&ctx(None, Some(&two)), "web", None, None, "web").unwrap();
        let hops: Vec<String> = t
            .jumps
            .iter()
            .map(|j| format!("{}@{}:{}", j.user, j.host, j.port))
            .collect();
        assert_eq!(hops, ["a@j1:1", "me@j2:22"]);
    }

    #[test]
    fn proxy_command_and_loops_are_errors() {
        let cfg = SshConfig::parse("Host a\n ProxyCommand nc %h %p\n", "cfg", None).unwrap();
        let e = resolve(&ctx(Some(&cfg), None), "a", None, None, "a").unwrap_err();
        assert!(
            e.to_string()
                .starts_with("cfg:2: ProxyCommand is not supported"),
            "{e}"
        );
        let cfg =
            SshConfig::parse("Host a\n ProxyJump b\nHost b\n ProxyJump a\n", "cfg", None).unwrap();
        let e = resolve(&ctx(Some(&cfg), None), "a", None, None, "a").unwrap_err();
        assert!(e.to_string().contains("point at each other"), "{e}");
    }
}

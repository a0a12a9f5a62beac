//! The way to a host's agent: TCP (with a timeout, and retries with backoff for DNS that
//! lags), SSH with a verified host key and public-key auth, then a
//! `direct-streamlocal@openssh.com` channel to the agent's socket, or, when the server
//! forbids that, an exec channel running `deploy-agent bridge`.
//!
//! With jump hosts (`ProxyJump`, `proxy_jump`), the first hop is reached over TCP and each
//! next one over a `direct-tcpip` channel of the previous hop's session, SSH running over
//! that channel; every hop's host key is verified and its session kept alive the same way.
//!
//! - [`known_hosts`]: OpenSSH-compatible host-key matching.
//! - [`keys`]: where client keys come from.
//! - [`config`]: the OpenSSH client config (`~/.ssh/config`).
//! - [`route`]: deploy.toml and the client config combined into an [`SshTarget`].

pub mod config;
pub mod keys;
pub mod known_hosts;
pub mod route;

use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use russh::client;
use russh::keys::{PrivateKeyWithHashAlg, PublicKey, PublicKeyOrCertificate};
use tokio::net::TcpStream;

use crate::io::Io;
use keys::KeySource;
use known_hosts::Verdict;

/// An SSH keepalive (answered by sshd itself, whatever the agent is doing) goes out when
/// the server has sent nothing for this long...
pub const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(5);
/// ...and after this many unanswered in a row the session counts as lost: a silent
/// network or a stopped sshd is found within about `(KEEPALIVE_MAX + 1) x
/// KEEPALIVE_INTERVAL` (20 s).
pub const KEEPALIVE_MAX: usize = 3;
/// The session ends when nothing at all happens on it for this long, e.g. a write stuck
/// on a full TCP buffer (which also stops the keepalives).
pub const INACTIVITY_TIMEOUT: Duration = Duration::from_secs(30);
/// Opening a channel, a diagnostic command, and the polite disconnect are bounded by this.
pub const CHANNEL_TIMEOUT: Duration = Duration::from_secs(20);

/// Everything needed to reach one SSH host (built by [`route::resolve`]).
#[derive(Debug, Clone)]
pub struct SshTarget {
    /// The name or address to connect to (after the ssh config's `HostName`); also the
    /// name looked up in known_hosts.
    pub host: String,
    pub port: u16,
    pub user: String,
    /// The name to show: `deploy@web-1:2222`, or `web-1 via jump host bastion` for a hop.
    pub display: String,
    /// Host keys are checked against all of these; a key accepted as new is added to the
    /// first.
    pub known_hosts: Vec<PathBuf>,
    pub keys: Arc<Vec<KeySource>>,
    /// The jump hosts in front of this host, first to last (their own `jumps` are empty).
    pub jumps: Vec<SshTarget>,
}

impl SshTarget {
    /// `user@host:port` as connected to (the display of a hop names the target too).
    fn display_name(&self) -> String {
        format!("{}@{}:{}", self.user, self.host, self.port)
    }

    fn known_hosts_shown(&self) -> String {
        match self.known_hosts.first() {
            Some(p) => p.display().to_string(),
            None => "known_hosts (UserKnownHostsFile none)".into(),
        }
    }
}

#[derive(Debug, Clone)]
pub struct SshOptions {
    pub accept_new_host_keys: bool,
    pub connect_timeout: Duration,
    pub connect_retries: u32,
    pub agent_socket: String,
    pub agent_bin: String,
}

#[derive(Debug, thiserror::Error)]
pub enum SshError {
    #[error(
        "{host}: host key is not known ({fingerprint}); add it to {known_hosts} \
         (ssh-keyscan -p {port} {name} >> {known_hosts}{where_}) or run once with \
         --accept-new-host-keys"
    )]
    UnknownHostKey {
        host: String,
        name: String,
        port: u16,
        fingerprint: String,
        known_hosts: String,
        /// Empty, or where to run ssh-keyscan when this machine cannot reach the host.
        where_: String,
    },
    #[error(
        "{host}: HOST KEY CHANGED: the server offered {fingerprint}, which does not match \
         {path}:{line}. This may be an attack. If the server was really re-keyed, remove \
         the old entry (ssh-keygen -R) and verify the new fingerprint out of band"
    )]
    ChangedHostKey {
        host: String,
        fingerprint: String,
        path: String,
        line: usize,
    },
    #[error("{host}: host key {fingerprint} is REVOKED in {path}:{line}; refusing to connect")]
    RevokedHostKey {
        host: String,
        fingerprint: String,
        path: String,
        line: usize,
    },
    #[error("{host}: cannot read known_hosts: {detail}")]
    KnownHosts { host: String, detail: String },
    #[error("{host}: could not connect after {attempts} attempt(s): {detail}")]
    Connect {
        host: String,
        attempts: u32,
        detail: String,
    },
    #[error("{host}: SSH handshake failed: {detail}")]
    Handshake { host: String, detail: String },
    #[error(
        "{host}: authentication as {user} failed (tried: {tried}); check that the key is in \
         ~{user}/.ssh/authorized_keys on the host"
    )]
    Auth {
        host: String,
        user: String,
        tried: String,
    },
    #[error("{host}: {detail}")]
    Agent { host: String, detail: String },
    /// The ssh config cannot be used: a usage error, not a connection failure.
    #[error("{0}")]
    Config(#[from] config::SshConfigError),
}

/// What our host-key check decided; russh only sees accept or reject.
#[derive(Default)]
struct Decision {
    error: Option<SshError>,
}

struct Handler {
    target: SshTarget,
    opts: SshOptions,
    decision: Arc<Mutex<Decision>>,
    /// Empty, or `, run on the jump host X` for a host behind jump hosts.
    via: String,
}

impl Handler {
    fn verify(&self, key: &PublicKey) -> Result<(), SshError> {
        let t = &self.target;
        let fingerprint = known_hosts::fingerprint(key);
        let verdict =
            known_hosts::check_files(&t.known_hosts, &t.host, t.port, key).map_err(|e| {
                SshError::KnownHosts {
                    host: t.display.clone(),
                    detail: e.to_string(),
                }
            })?;
        match verdict {
            Verdict::Trusted => Ok(()),
            Verdict::Unknown if self.opts.accept_new_host_keys => {
                let Some(path) = t.known_hosts.first() else {
                    return Err(SshError::KnownHosts {
                        host: t.display.clone(),
                        detail: "UserKnownHostsFile none: nowhere to record a new host key".into(),
                    });
                };
                known_hosts::append(path, &t.host, t.port, key).map_err(|e| {
                    SshError::KnownHosts {
                        host: t.display.clone(),
                        detail: e.to_string(),
                    }
                })?;
                crate::err!(
                    "{}: new host key {fingerprint} added to {}",
                    t.display,
                    path.display()
                );
                Ok(())
            }
            Verdict::Unknown => Err(SshError::UnknownHostKey {
                host: t.display.clone(),
                name: t.host.clone(),
                port: t.port,
                fingerprint,
                known_hosts: t.known_hosts_shown(),
                where_: self.via.clone(),
            }),
            Verdict::Changed { path, line } => Err(SshError::ChangedHostKey {
                host: t.display.clone(),
                fingerprint,
                path: path.display().to_string(),
                line,
            }),
            Verdict::Revoked { path, line } => Err(SshError::RevokedHostKey {
                host: t.display.clone(),
                fingerprint,
                path: path.display().to_string(),
                line,
            }),
        }
    }
}

impl client::Handler for Handler {
    type Error = russh::Error;

    async fn check_server_key(
        &mut self,
        server_public_key: &PublicKeyOrCertificate,
    ) -> Result<bool, Self::Error> {
        let result = match server_public_key {
            PublicKeyOrCertificate::PublicKey { key, .. } => self.verify(key),
            PublicKeyOrCertificate::Certificate(_) => Err(SshError::Handshake {
                host: self.target.display.clone(),
                detail: "the server presented a host certificate; deployctl verifies plain \
                         host keys from known_hosts only"
                    .into(),
            }),
        };
        match result {
            Ok(()) => Ok(true),
            Err(e) => {
                self.decision
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .error = Some(e);
                Ok(false)
            }
        }
    }
}

fn ssh_config(target: &SshTarget) -> client::Config {
    use russh::cipher;
    let mut preferred = russh::Preferred::default();
    // AES-GCM is faster than chacha20-poly1305 where the CPU has AES instructions.
    if has_aes_instructions() {
        preferred.cipher = std::borrow::Cow::Owned(vec![
            cipher::AES_128_GCM,
            cipher::AES_256_GCM,
            cipher::CHACHA20_POLY1305,
            cipher::AES_256_CTR,
            cipher::AES_128_CTR,
        ]);
    }
    // Ask first for the key types known_hosts already records for this host, as
    // OpenSSH does, so a host known by its ECDSA key is not "changed" by ed25519.
    let known =
        known_hosts::known_host_key_algorithms(&target.known_hosts, &target.host, target.port)
            .unwrap_or_default();
    if !known.is_empty() {
        let mut keys: Vec<russh::keys::Algorithm> = Vec::new();
        for a in known {
            if a.clone().is_rsa() {
                keys.push(russh::keys::Algorithm::Rsa {
                    hash: Some(russh::keys::HashAlg::Sha512),
                });
                keys.push(russh::keys::Algorithm::Rsa {
                    hash: Some(russh::keys::HashAlg::Sha256),
                });
            } else {
                keys.push(a);
            }
        }
        for a in preferred.key.iter() {
            if !keys.contains(a) {
                keys.push(a.clone());
            }
        }
        preferred.key = std::borrow::Cow::Owned(keys);
    }
    client::Config {
        preferred,
        // A write the network never takes (a full TCP buffer towards a silent peer)
        // keeps russh from sending keepalives; this ends the session then.
        inactivity_timeout: Some(INACTIVITY_TIMEOUT),
        keepalive_interval: Some(KEEPALIVE_INTERVAL),
        keepalive_max: KEEPALIVE_MAX,
        window_size: 16 * 1024 * 1024,
        maximum_packet_size: 65535,
        channel_buffer_size: 256,
        nodelay: true,
        ..Default::default()
    }
}

fn has_aes_instructions() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::arch::is_x86_feature_detected!("aes")
    }
    #[cfg(target_arch = "aarch64")]
    {
        std::arch::is_aarch64_feature_detected!("aes")
    }
    #[cfg(not(any(target_arch = "x86_64", target_arch = "aarch64")))]
    {
        false
    }
}

/// How long a host that actively refuses connections is retried: long enough to ride out
/// an sshd restart, short enough that a wrong port or a stopped sshd is reported at once.
const REFUSED_FOR: Duration = Duration::from_millis(1500);

/// TCP connect with a timeout per attempt and exponential backoff between attempts, for
/// DNS errors and timeouts (in CI the Tailscale DNS answer can lag the job start). A
/// refused connection means the host answered: it is retried briefly ([`REFUSED_FOR`]),
/// not with the whole backoff.
async fn tcp_connect(target: &SshTarget, opts: &SshOptions) -> Result<TcpStream, SshError> {
    let attempts = opts.connect_retries.max(1);
    let mut delay = Duration::from_millis(500);
    let mut first_refusal: Option<tokio::time::Instant> = None;
    let mut attempt = 0;
    loop {
        attempt += 1;
        let addr = (target.host.as_str(), target.port);
        let (last, refused) =
            match tokio::time::timeout(opts.connect_timeout, TcpStream::connect(addr)).await {
                Ok(Ok(s)) => {
                    let _ = s.set_nodelay(true);
                    return Ok(s);
                }
                Ok(Err(e)) => (
                    e.to_string(),
                    e.kind() == std::io::ErrorKind::ConnectionRefused,
                ),
                Err(_) => (
                    format!("timed out after {}s", opts.connect_timeout.as_secs_f32()),
                    false,
                ),
            };
        let pause = if attempt >= attempts {
            None
        } else if refused {
            let since = *first_refusal.get_or_insert_with(tokio::time::Instant::now);
            (since.elapsed() < REFUSED_FOR).then_some(Duration::from_millis(250))
        } else {
            Some(delay)
        };
        let Some(pause) = pause else {
            return Err(SshError::Connect {
                host: target.display.clone(),
                attempts: attempt,
                detail: last,
            });
        };
        tracing::debug!(
            "{}: connect attempt {attempt} failed: {last}",
            target.display
        );
        tokio::time::sleep(pause).await;
        if !refused {
            delay = (delay * 2).min(Duration::from_secs(8));
        }
    }
}

/// An authenticated SSH session.
pub struct Session {
    handle: client::Handle<Handler>,
    target: SshTarget,
    opts: SshOptions,
    /// The jump hosts' sessions, first to last: each carries the next one's connection,
    /// so they live as long as this one.
    jumps: Vec<client::Handle<Handler>>,
    /// Why the direct-streamlocal channel to the agent's socket was refused, when it was
    /// (then the bridge was tried): the first half of an "agent not reachable" message.
    streamlocal_refused: Mutex<Option<String>>,
}

/// Connects to `target`, through its jump hosts when it has some: TCP to the first hop,
/// then for each next hop a `direct-tcpip` channel from the previous one, with SSH over
/// it. Each hop's host key is verified and its login authenticated like a target's.
pub async fn connect(target: SshTarget, opts: SshOptions) -> Result<Session, SshError> {
    let mut hops = target.jumps.clone();
    let mut last = target.clone();
    last.jumps.clear();
    hops.push(last);
    let mut handles: Vec<client::Handle<Handler>> = Vec::new();
    for (i, hop) in hops.iter().enumerate() {
        let via = match i {
            0 => String::new(),
            _ => format!(", run on the jump host {}", hops[i - 1].display_name()),
        };
        let handle = match handles.last() {
            None => match tcp_connect(hop, &opts).await {
                Ok(tcp) => handshake(tcp, hop, &opts, via).await,
                Err(e) => Err(e),
            },
            Some(prev) => match open_tcpip(prev, hop, &hops[i - 1], &opts).await {
                Ok(channel) => handshake(channel.into_stream(), hop, &opts, via).await,
                Err(e) => Err(e),
            },
        };
        let handle = match handle {
            Ok(h) => h,
            Err(e) => {
                close_all(handles).await;
                return Err(e);
            }
        };
        handles.push(handle);
    }
    let handle = handles.pop().expect("at least the target");
    Ok(Session {
        handle,
        target,
        opts,
        jumps: handles,
        streamlocal_refused: Mutex::new(None),
    })
}

/// A `direct-tcpip` channel from the jump host `from` (session `prev`) to `to`.
async fn open_tcpip(
    prev: &client::Handle<Handler>,
    to: &SshTarget,
    from: &SshTarget,
    opts: &SshOptions,
) -> Result<russh::Channel<client::Msg>, SshError> {
    let fail = |detail: String| SshError::Connect {
        host: to.display.clone(),
        attempts: 1,
        detail: format!(
            "the jump host {} could not open a connection to {}:{}: {detail}",
            from.display_name(),
            to.host,
            to.port
        ),
    };
    let open = prev.channel_open_direct_tcpip(to.host.clone(), u32::from(to.port), "127.0.0.1", 0);
    match tokio::time::timeout(opts.connect_timeout.max(Duration::from_secs(1)), open).await {
        Ok(Ok(ch)) => Ok(ch),
        Ok(Err(e)) => Err(fail(e.to_string())),
        Err(_) => Err(fail(format!(
            "timed out after {}s",
            opts.connect_timeout.as_secs_f32()
        ))),
    }
}

async fn close_all(handles: Vec<client::Handle<Handler>>) {
    for h in handles.into_iter().rev() {
        let _ = tokio::time::timeout(
            Duration::from_secs(3),
            h.disconnect(russh::Disconnect::ByApplication, "", "en"),
        )
        .await;
    }
}

/// The SSH handshake over `stream`, the host key check, and authentication, bounded in
/// time.
async fn handshake<S>(
    stream: S,
    target: &SshTarget,
    opts: &SshOptions,
    via: String,
) -> Result<client::Handle<Handler>, SshError>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let decision = Arc::new(Mutex::new(Decision::default()));
    let handler = Handler {
        target: target.clone(),
        opts: opts.clone(),
        decision: decision.clone(),
        via,
    };
    let config = Arc::new(ssh_config(target));
    let handshake = tokio::time::timeout(
        opts.connect_timeout.max(Duration::from_secs(5)) * 2,
        client::connect_stream(config, stream, handler),
    )
    .await;
    let mut handle = match handshake {
        Ok(Ok(h)) => h,
        Ok(Err(e)) => {
            if let Some(err) = decision
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .error
                .take()
            {
                return Err(err);
            }
            return Err(SshError::Handshake {
                host: target.display.clone(),
                detail: e.to_string(),
            });
        }
        Err(_) => {
            return Err(SshError::Handshake {
                host: target.display.clone(),
                detail: "timed out".into(),
            });
        }
    };
    authenticate(&mut handle, target).await?;
    Ok(handle)
}

/// For an RSA key, the best signature hash the server accepts (rsa-sha2-512/256).
async fn rsa_hash(
    handle: &client::Handle<Handler>,
    algorithm: russh::keys::Algorithm,
) -> Option<russh::keys::HashAlg> {
    if !algorithm.is_rsa() {
        return None;
    }
    handle
        .best_supported_rsa_hash()
        .await
        .ok()
        .flatten()
        .flatten()
}

async fn authenticate(
    handle: &mut client::Handle<Handler>,
    target: &SshTarget,
) -> Result<(), SshError> {
    let mut tried = Vec::new();
    for source in target.keys.iter() {
        match source {
            KeySource::Key { key, origin } => {
                let hash = rsa_hash(handle, key.algorithm()).await;
                let k = PrivateKeyWithHashAlg::new(key.clone(), hash);
                tried.push(origin.clone());
                match handle.authenticate_publickey(&target.user, k).await {
                    Ok(r) if r.success() => return Ok(()),
                    Ok(_) => {}
                    Err(e) => {
                        return Err(SshError::Handshake {
                            host: target.display.clone(),
                            detail: e.to_string(),
                        });
                    }
                }
            }
            KeySource::Agent { path } => {
                let Ok(mut agent) =
                    russh::keys::agent::client::AgentClient::connect_uds(path).await
                else {
                    tried.push(format!("ssh-agent at {} (unreachable)", path.display()));
                    continue;
                };
                let identities = agent.request_identities().await.unwrap_or_default();
                if identities.is_empty() {
                    tried.push("ssh-agent (no keys)".into());
                }
                for id in identities {
                    let key = id.public_key().into_owned();
                    let hash = rsa_hash(handle, key.algorithm()).await;
                    tried.push(format!("ssh-agent key {}", known_hosts::fingerprint(&key)));
                    if let Ok(r) = handle
                        .authenticate_publickey_with(&target.user, key, hash, &mut agent)
                        .await
                        && r.success()
                    {
                        return Ok(());
                    }
                }
            }
        }
    }
    if tried.is_empty() {
        tried.push("no key: set DEPLOYCTL_SSH_KEY, ssh_key, or run an ssh-agent".into());
    }
    Err(SshError::Auth {
        host: target.display.clone(),
        user: target.user.clone(),
        tried: tried.join(", "),
    })
}

impl Session {
    /// A byte stream to the agent: streamlocal first, the exec bridge as fallback.
    pub async fn open_agent(&self) -> Result<Box<dyn Io>, SshError> {
        tokio::time::timeout(CHANNEL_TIMEOUT, self.open_agent_inner())
            .await
            .unwrap_or_else(|_| {
                Err(self.agent_err(format!(
                    "no answer opening a channel to deploy-agent within {}s",
                    CHANNEL_TIMEOUT.as_secs()
                )))
            })
    }

    async fn open_agent_inner(&self) -> Result<Box<dyn Io>, SshError> {
        match self
            .handle
            .channel_open_direct_streamlocal(self.opts.agent_socket.clone())
            .await
        {
            Ok(ch) => return Ok(Box::new(ch.into_stream())),
            Err(e) => {
                tracing::debug!(
                    "{}: streamlocal to {} refused ({e}); falling back to `deploy-agent bridge`",
                    self.target.display,
                    self.opts.agent_socket
                );
                *self
                    .streamlocal_refused
                    .lock()
                    .unwrap_or_else(|p| p.into_inner()) = Some(e.to_string());
            }
        }
        let ch = self
            .handle
            .channel_open_session()
            .await
            .map_err(|e| self.agent_err(format!("cannot open a session channel: {e}")))?;
        let cmd = format!(
            "{} bridge --socket {}",
            shell_quote(&self.opts.agent_bin),
            shell_quote(&self.opts.agent_socket)
        );
        ch.exec(true, cmd)
            .await
            .map_err(|e| self.agent_err(format!("cannot run deploy-agent bridge: {e}")))?;
        Ok(Box::new(ch.into_stream()))
    }

    /// Why the agent could not be reached: what was tried (the socket over
    /// direct-streamlocal, then the `deploy-agent bridge` fallback) and the most likely
    /// cause, from facts asked over a separate exec channel (the socket's presence, type,
    /// owner, mode, whether anything listens on it, whether this user may open it, and
    /// whether the bridge binary is on the SSH PATH).
    pub async fn diagnose_agent(&self) -> String {
        let script = format!(
            "s={sock}; b={bin}; \
             if command -v \"$b\" >/dev/null 2>&1; then echo bin=yes; else echo bin=no; fi; \
             d=$(dirname \"$s\"); \
             if [ ! -d \"$d\" ]; then echo dir=missing; \
             elif [ ! -x \"$d\" ]; then echo dir=denied; else echo dir=ok; fi; \
             if [ -S \"$s\" ]; then echo sock=socket; \
             elif [ -e \"$s\" ]; then echo sock=other; else echo sock=missing; fi; \
             if [ -r \"$s\" ] && [ -w \"$s\" ]; then echo access=yes; else echo access=no; fi; \
             echo \"stat=$(stat -c '%U:%G %a' \"$s\" 2>/dev/null)\"; \
             echo \"user=$(id -un 2>/dev/null)\"; \
             echo \"groups=$(id -Gn 2>/dev/null)\"; \
             if [ -r /proc/net/unix ]; then \
               if awk -v p=\"$s\" '$NF == p {{ f = 1 }} END {{ exit !f }}' /proc/net/unix; \
               then echo listening=yes; else echo listening=no; fi; \
             fi",
            bin = shell_quote(&self.opts.agent_bin),
            sock = shell_quote(&self.opts.agent_socket)
        );
        let out = tokio::time::timeout(CHANNEL_TIMEOUT, self.exec_capture(&script))
            .await
            .ok()
            .and_then(Result::ok)
            .unwrap_or_default();
        let streamlocal = self
            .streamlocal_refused
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        explain_unreachable(
            &AgentFacts::parse(&out),
            &self.opts.agent_socket,
            &self.opts.agent_bin,
            &self.target.user,
            streamlocal.as_deref(),
        )
    }

    /// Runs a command and returns its stdout (for diagnostics and bootstrap). The channel
    /// ends when the command does, or when the session is lost (keepalives).
    pub async fn exec_capture(&self, command: &str) -> Result<String, SshError> {
        let mut ch = self
            .handle
            .channel_open_session()
            .await
            .map_err(|e| self.agent_err(e.to_string()))?;
        ch.exec(true, command)
            .await
            .map_err(|e| self.agent_err(e.to_string()))?;
        let mut out = Vec::new();
        while let Some(msg) = ch.wait().await {
            match msg {
                russh::ChannelMsg::Data { data } => out.extend_from_slice(&data),
                russh::ChannelMsg::Eof | russh::ChannelMsg::Close => break,
                _ => {}
            }
        }
        Ok(String::from_utf8_lossy(&out).into_owned())
    }

    /// Runs a command with `input` as its stdin (then EOF) and returns its exit status
    /// (`None` when it was killed by a signal or the channel closed without one), stdout
    /// and stderr. Stdin is streamed, not held in memory; when the command exits before
    /// reading all of it, the rest is dropped. Used by bootstrap to upload files.
    pub async fn exec_with_input(
        &self,
        command: &str,
        input: impl tokio::io::AsyncRead + Unpin,
    ) -> Result<(Option<u32>, Vec<u8>, Vec<u8>), SshError> {
        let ch = self
            .handle
            .channel_open_session()
            .await
            .map_err(|e| self.agent_err(e.to_string()))?;
        ch.exec(true, command)
            .await
            .map_err(|e| self.agent_err(e.to_string()))?;
        let (mut read, write) = ch.split();
        let send = async {
            write.data(input).await?;
            write.eof().await
        };
        tokio::pin!(send);
        let mut sending = true;
        let mut send_error = None;
        let (mut status, mut stdout, mut stderr) = (None, Vec::new(), Vec::new());
        loop {
            tokio::select! {
                r = &mut send, if sending => {
                    sending = false;
                    if let Err(e) = r {
                        send_error = Some(e.to_string());
                    }
                }
                msg = read.wait() => match msg {
                    Some(russh::ChannelMsg::Data { data }) => stdout.extend_from_slice(&data),
                    Some(russh::ChannelMsg::ExtendedData { data, ext: 1 }) => {
                        stderr.extend_from_slice(&data)
                    }
                    Some(russh::ChannelMsg::ExitStatus { exit_status }) => {
                        status = Some(exit_status)
                    }
                    Some(russh::ChannelMsg::Close) | None => break,
                    Some(_) => {}
                },
            }
        }
        if status.is_none()
            && let Some(e) = send_error
        {
            return Err(self.agent_err(format!("sending a command's input: {e}")));
        }
        Ok((status, stdout, stderr))
    }

    fn agent_err(&self, detail: String) -> SshError {
        SshError::Agent {
            host: self.target.display.clone(),
            detail,
        }
    }

    /// Says goodbye to the server, then to each jump host from the last, or gives up
    /// after a few seconds each (a dead session).
    pub async fn close(self) {
        let mut all = self.jumps;
        all.push(self.handle);
        close_all(all).await;
    }
}

/// What the diagnostic script found on the host (see [`Session::diagnose_agent`]);
/// `None` where it did not answer.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct AgentFacts {
    /// The bridge binary is on the SSH user's PATH (or is an existing absolute path).
    pub bin: Option<bool>,
    /// "missing", "denied" (not searchable by the user) or "ok": the socket's directory.
    pub dir: Option<String>,
    /// "socket", "other" (a file that is not a socket) or "missing".
    pub sock: Option<String>,
    /// The user may read and write the socket file.
    pub access: Option<bool>,
    /// `owner:group mode` of the socket file.
    pub stat: Option<String>,
    pub user: Option<String>,
    pub groups: Option<String>,
    /// Something listens on the socket path (from /proc/net/unix).
    pub listening: Option<bool>,
}

impl AgentFacts {
    pub fn parse(out: &str) -> AgentFacts {
        let mut f = AgentFacts::default();
        let yes = |v: &str| match v {
            "yes" => Some(true),
            "no" => Some(false),
            _ => None,
        };
        let text = |v: &str| (!v.is_empty()).then(|| v.to_owned());
        for line in out.lines() {
            let Some((k, v)) = line.split_once('=') else {
                continue;
            };
            let v = v.trim();
            match k.trim() {
                "bin" => f.bin = yes(v),
                "dir" => f.dir = text(v),
                "sock" => f.sock = text(v),
                "access" => f.access = yes(v),
                "stat" => f.stat = text(v),
                "user" => f.user = text(v),
                "groups" => f.groups = text(v),
                "listening" => f.listening = yes(v),
                _ => {}
            }
        }
        f
    }
}

/// The "deploy-agent not reachable" message: what was tried, then the likely cause. It
/// says "not installed" only when nothing points at an installed agent (no socket and no
/// binary).
pub fn explain_unreachable(
    f: &AgentFacts,
    socket: &str,
    bin: &str,
    ssh_user: &str,
    streamlocal_refused: Option<&str>,
) -> String {
    let user = f.user.as_deref().unwrap_or(ssh_user);
    let bridge = format!("`{bin} bridge --socket {socket}`");
    let tried = match streamlocal_refused {
        Some(e) => format!(
            "tried the socket {socket} over SSH (direct-streamlocal: {e}), then the \
             fallback {bridge}{}",
            match f.bin {
                Some(false) => format!(" ({bin} is not on {user}'s PATH over SSH)"),
                _ => String::new(),
            }
        ),
        None => format!(
            "the socket {socket} was opened over SSH (direct-streamlocal) but no deploy-agent \
             handshake came back"
        ),
    };
    let stat = f
        .stat
        .as_deref()
        .map(|s| format!(" ({s})"))
        .unwrap_or_default();
    let cause = match (f.dir.as_deref(), f.sock.as_deref()) {
        (None, None) => "the host did not answer the diagnostic command; check the socket and \
                         the agent by hand (systemctl status deploy-agent)"
            .to_owned(),
        (Some("denied"), _) => format!(
            "permission denied: {user} may not enter the socket's directory {}; add {user} \
             to the agent's socket group (socket_group) and log in again",
            std::path::Path::new(socket)
                .parent()
                .map(|p| p.display().to_string())
                .unwrap_or_default()
        ),
        (_, Some("missing")) if f.bin == Some(false) => format!(
            "socket missing: no deploy-agent socket at {socket} and no {bin} on the PATH; \
             deploy-agent may never have been set up on this host (`deployctl bootstrap ENV`), \
             or it is not running, or agent_socket is wrong (it must match the agent's \
             `socket` setting)"
        ),
        (_, Some("missing")) => format!(
            "socket missing: no deploy-agent socket at {socket}; deploy-agent is not running \
             (systemctl status deploy-agent) or agent_socket is wrong (it must match the \
             agent's `socket` setting)"
        ),
        (_, Some("other")) => format!(
            "{socket} exists but is not a socket{stat}; agent_socket is wrong (it must match \
             the agent's `socket` setting)"
        ),
        (_, Some(_)) if f.access == Some(false) => format!(
            "permission denied: {user} (groups: {}) may not open {socket}{stat}; add {user} to \
             the socket's group (the agent's socket_group) and log in again",
            f.groups.as_deref().unwrap_or("?")
        ),
        (_, Some(_)) if f.listening == Some(false) => format!(
            "nothing is listening on {socket}{stat}: a stale socket, deploy-agent is not \
             running (systemctl status deploy-agent; journalctl -u deploy-agent)"
        ),
        (_, Some(_)) if streamlocal_refused.is_some() && f.bin == Some(false) => format!(
            "the agent listens on {socket}, but sshd refused the direct channel \
             (AllowStreamLocalForwarding / DisableForwarding in sshd_config) and the bridge \
             is not on the PATH: allow streamlocal forwarding for {user}, or set agent_bin to \
             the full path of deploy-agent"
        ),
        (_, Some(_)) if streamlocal_refused.is_some() => format!(
            "the agent listens on {socket}, sshd refused the direct channel (streamlocal \
             forwarding disabled?) and the bridge did not get an answer; see the agent's log \
             (journalctl -u deploy-agent)"
        ),
        (_, Some(_)) => format!(
            "what listens on {socket} did not answer as deploy-agent; is agent_socket another \
             program's socket? See the agent's log (journalctl -u deploy-agent)"
        ),
        (_, None) => format!("could not inspect {socket} on the host"),
    };
    format!("deploy-agent not reachable: {tried}. Likely cause: {cause}")
}

/// Quotes a word for a POSIX shell.
pub fn shell_quote(s: &str) -> String {
    if !s.is_empty()
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"/._-:=@%+,".contains(&b))
    {
        return s.to_owned();
    }
    format!("'{}'", s.replace('\'', r"'\''"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn facts(out: &str) -> AgentFacts {
        AgentFacts::parse(out)
    }

    #[test]
    fn unreachable_agent_messages_name_the_likely_cause() {
        // See: #18
        let sock = "/run/deploy-agent/agent.sock";
        let refused = Some("Failed to open channel (ConnectFailed)");
        let say =
            |out: &str| explain_unreachable(&facts(out), sock, "deploy-agent", "deploy", refused);
        let missing = say("bin=no\ndir=ok\nsock=missing\naccess=no\nuser=deploy\n");
        assert!(missing.contains("socket missing"), "{missing}");
        assert!(!missing.contains("not installed"), "{missing}");
        let denied = say(
            "bin=yes\ndir=ok\nsock=socket\naccess=no\nstat=deploy-agent:deploy 660\n\
             user=deploy\ngroups=deploy users\nlistening=yes\n",
        );
        assert!(denied.contains("permission denied"), "{denied}");
        assert!(denied.contains("deploy-agent:deploy 660"), "{denied}");
        let dir = say("bin=yes\ndir=denied\nsock=missing\naccess=no\nuser=deploy\n");
        assert!(
            dir.contains("may not enter the socket's directory /run/deploy-agent"),
            "{dir}"
        );
        let stale = say("bin=yes\ndir=ok\nsock=socket\naccess=yes\nlistening=no\n");
        assert!(stale.contains("stale socket"), "{stale}");
        let forbidden = say("bin=no\ndir=ok\nsock=socket\naccess=yes\nlistening=yes\n");
        assert!(
            forbidden.contains("sshd refused the direct channel"),
            "{forbidden}"
        );
        let other = say("bin=yes\ndir=ok\nsock=other\naccess=yes\n");
        assert!(other.contains("is not a socket"), "{other}");
        let silent = say("");
        assert!(silent.contains("did not answer the diagnostic"), "{silent}");
        for m in [&missing, &denied, &stale, &forbidden] {
            assert!(m.contains(sock) && m.contains("bridge"), "{m}");
        }
    }

    #[test]
    fn quoting() {
        assert_eq!(
            shell_quote("/run/deploy-agent/agent.sock"),
            "/run/deploy-agent/agent.sock"
        );
        assert_eq!(shell_quote("a b"), "'a b'");
        assert_eq!(shell_quote("it's"), r"'it'\''s'");
        assert_eq!(shell_quote("$(rm -rf /)"), "'$(rm -rf /)'");
        assert_eq!(shell_quote(""), "''");
    }
}

//! From a configured host to a talking agent: SSH (or the local socket for `local`),
//! the WebSocket framing, and the version handshake.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use crate::client::{AgentClient, ClientError};
use crate::config::{Environment, Host};
use crate::ssh::{self, SshError, SshOptions, SshTarget, keys::KeySource};

#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    #[error(transparent)]
    Ssh(#[from] SshError),
    #[error("{host}: cannot connect to deploy-agent at {socket}: {detail}")]
    Local {
        host: String,
        socket: String,
        detail: String,
    },
    #[error("{host}: {source}")]
    Client { host: String, source: ClientError },
}

/// Why the local socket could not be opened, with the likely cause.
fn local_cause(e: &std::io::Error) -> String {
    use std::io::ErrorKind;
    let cause = match e.kind() {
        ErrorKind::NotFound => {
            "socket missing: deploy-agent is not running, or agent_socket is wrong (it must \
             match the agent's `socket` setting)"
        }
        ErrorKind::PermissionDenied => {
            "permission denied: this user is not in the socket's group (the agent's \
             socket_group)"
        }
        ErrorKind::ConnectionRefused => {
            "nothing is listening: a stale socket, deploy-agent is not running"
        }
        _ => "is deploy-agent running?",
    };
    format!("{e}; {cause}")
}

/// A connection to one host's agent, with the SSH session kept alive under it.
pub struct HostConn {
    pub name: String,
    pub client: AgentClient,
    ssh: Option<ssh::Session>,
}

impl HostConn {
    /// Closes the agent connection and the SSH session; each step is bounded, so a dead
    /// connection cannot hold the command up.
    pub async fn close(self) {
        let HostConn { client, ssh, .. } = self;
        client.close().await;
        if let Some(s) = ssh {
            s.close().await;
        }
    }
}

/// The longest the agent can take to answer a deploy, a rollback, or any request that
/// runs the app's commands, derived from the environment's own timeouts: up to four
/// commands (migrate, restart, and on failure a restart of the previous release, or
/// compose's pull/up/down) at `release.timeout` each, the health check twice (the new
/// release, then the previous one after a rollback) at `retries x (interval +
/// request_timeout)`, and two minutes for unpacking, copying and bookkeeping. Lost
/// connections are found much sooner (SSH keepalives, the channel closing); this bounds
/// the wait on an agent that is still connected but never answers.
pub fn reply_budget(env: &Environment) -> Duration {
    let health = env
        .health
        .as_ref()
        .map(|h| {
            h.interval
                .saturating_add(h.request_timeout)
                .saturating_mul(h.retries.max(1))
        })
        .unwrap_or_default();
    env.release
        .timeout
        .saturating_mul(4)
        .saturating_add(health.saturating_mul(2))
        .saturating_add(Duration::from_secs(120))
}

pub fn ssh_options(env: &Environment) -> SshOptions {
    SshOptions {
        accept_new_host_keys: env.accept_new_host_keys,
        connect_timeout: env.connect_timeout,
        connect_retries: env.connect_retries,
        agent_socket: env.agent_socket.clone(),
        agent_bin: env.agent_bin.clone(),
    }
}

/// How to reach `host` over SSH: deploy.toml combined with the ssh config (see
/// [`ssh::route`]). `None` for `local`. An error is a usage error (a bad ssh config).
pub fn ssh_target(
    host: &Host,
    env: &Environment,
    keys: Arc<Vec<KeySource>>,
) -> Result<Option<SshTarget>, SshError> {
    let Host::Ssh {
        user,
        host: h,
        port,
    } = host
    else {
        return Ok(None);
    };
    let home = std::env::var_os("HOME").map(PathBuf::from);
    let config = ssh::config::load(&env.ssh_config, home.as_deref())?;
    let local_user = std::env::var("USER").unwrap_or_default();
    let ctx = ssh::route::Context {
        config: config.as_deref(),
        user: &env.user,
        user_set: env.user_set,
        known_hosts: &env.known_hosts,
        known_hosts_set: env.known_hosts_set,
        keys,
        keys_set: env.ssh_key.is_some()
            || std::env::var("DEPLOYCTL_SSH_KEY").is_ok_and(|k| !k.trim().is_empty()),
        proxy_jump: env.proxy_jump.as_deref(),
        home: home.as_deref(),
        local_user: &local_user,
        auth_sock: std::env::var_os("SSH_AUTH_SOCK").map(PathBuf::from),
    };
    // The host list cannot tell `web:22` from `web`: both leave the port to the config.
    let port = (*port != Host::DEFAULT_PORT).then_some(*port);
    Ok(Some(ssh::route::resolve(
        &ctx,
        h,
        user.as_deref(),
        port,
        &host.to_string(),
    )?))
}

/// Connects to one host and completes the agent handshake.
pub async fn connect(
    host: &Host,
    env: &Environment,
    keys: Arc<Vec<KeySource>>,
) -> Result<HostConn, ConnectError> {
    let name = host.to_string();
    match host {
        Host::Local => {
            let socket = PathBuf::from(&env.agent_socket);
            let stream = tokio::time::timeout(
                Duration::from_secs(10),
                tokio::net::UnixStream::connect(&socket),
            )
            .await
            .map_err(|_| {
                "timed out; is deploy-agent stuck? (journalctl -u deploy-agent)".to_string()
            })
            .and_then(|r| r.map_err(|e| local_cause(&e)))
            .map_err(|detail| ConnectError::Local {
                host: name.clone(),
                socket: env.agent_socket.clone(),
                detail,
            })?;
            let mut client = AgentClient::handshake(Box::new(stream), &name)
                .await
                .map_err(|source| ConnectError::Client {
                    host: name.clone(),
                    source,
                })?;
            client.set_reply_timeout(reply_budget(env));
            Ok(HostConn {
                name,
                client,
                ssh: None,
            })
        }
        Host::Ssh { .. } => {
            let target = ssh_target(host, env, keys)?.expect("an SSH host");
            let session = ssh::connect(target, ssh_options(env)).await?;
            let io = session.open_agent().await?;
            match AgentClient::handshake(io, &name).await {
                Ok(mut client) => {
                    client.set_reply_timeout(reply_budget(env));
                    Ok(HostConn {
                        name,
                        client,
                        ssh: Some(session),
                    })
                }
                Err(ClientError::Agent(e)) => Err(ConnectError::Client {
                    host: name,
                    source: ClientError::Agent(e),
                }),
                Err(_) => {
                    let detail = session.diagnose_agent().await;
                    session.close().await;
                    Err(SshError::Agent { host: name, detail }.into())
                }
            }
        }
    }
}

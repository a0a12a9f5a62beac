//! `deploy-agent`: see the library for what lives where.

use std::path::PathBuf;
use std::process::ExitCode;

use agent::config::{AgentConfig, Overrides};
use clap::{CommandFactory, FromArgMatches, Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "deploy-agent",
    about = "The deployctl agent: owns every deploy on this server"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the daemon (under systemd: Type=notify).
    Serve {
        /// Config file [default: /etc/deploy-agent/agent.toml, may be absent]
        #[arg(long)]
        config: Option<PathBuf>,
        /// Unix socket to listen on [default: /run/deploy-agent/agent.sock]
        #[arg(long)]
        socket: Option<PathBuf>,
        /// Group that may connect (the socket is mode 0660)
        #[arg(long)]
        socket_group: Option<String>,
        /// A root under which deploy_to may lie (repeatable)
        #[arg(long = "allowed-root")]
        allowed_roots: Vec<PathBuf>,
    },
    /// Splice stdin/stdout to the agent's socket (the fallback when sshd forbids
    /// streamlocal forwarding).
    Bridge {
        #[arg(long, default_value = agent::config::DEFAULT_SOCKET)]
        socket: PathBuf,
    },
}

fn main() -> ExitCode {
    let version = format!(
        "{} (protocol {})",
        env!("CARGO_PKG_VERSION"),
        proto::PROTOCOL_VERSION
    );
    let matches = Cli::command()
        .version(Box::leak(version.into_boxed_str()) as &'static str)
        .get_matches();
    let cli = match Cli::from_arg_matches(&matches) {
        Ok(c) => c,
        Err(e) => e.exit(),
    };
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("deploy-agent: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = match cli.command {
        Command::Serve {
            config,
            socket,
            socket_group,
            allowed_roots,
        } => {
            tracing_subscriber::fmt()
                .with_env_filter(
                    tracing_subscriber::EnvFilter::try_from_env("DEPLOY_AGENT_LOG")
                        .unwrap_or_else(|_| "info".into()),
                )
                .with_writer(std::io::stderr)
                // journald shows escape codes verbatim
                .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
                .init();
            let over = Overrides {
                config,
                socket,
                socket_group,
                allowed_roots,
            };
            match AgentConfig::load(&over) {
                Ok(cfg) => rt.block_on(agent::server::run(cfg)),
                Err(e) => Err(e.into()),
            }
        }
        Command::Bridge { socket } => rt.block_on(agent::server::bridge(&socket)),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("deploy-agent: {e:#}");
            ExitCode::FAILURE
        }
    }
}

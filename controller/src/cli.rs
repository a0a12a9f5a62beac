//! The command line. Parsing only: the work is in [`crate::commands`].

use std::path::{Path, PathBuf};

use clap::{Args, Parser, Subcommand, ValueHint};
use clap_complete::{ArgValueCandidates, CompletionCandidate};

const EXAMPLES: &str = "\
Examples:
  deployctl check staging
  deployctl push staging --artifact dist/myapp.tar.gz --version \"$GITHUB_SHA\"
  deployctl push production --yes
  BACKEND_IMAGE=ghcr.io/org/backend:$GITHUB_SHA deployctl push edge --version \"$GITHUB_SHA\"
  deployctl rollback production --to 20261122214450
  deployctl status production --json
  deployctl push review --instance pr-42
  deployctl destroy review --instance pr-42
  deployctl demo";

#[derive(Parser, Debug)]
#[command(
    name = "deployctl",
    version,
    about = "Deploy web apps to your own servers over SSH, safely",
    after_help = EXAMPLES
)]
pub struct Cli {
    /// Path to deploy.toml
    #[arg(
        long,
        global = true,
        default_value = "deploy.toml",
        env = "DEPLOYCTL_CONFIG",
        value_hint = ValueHint::FilePath
    )]
    pub config: PathBuf,

    /// Trust and record the host key of a host seen for the first time (like
    /// StrictHostKeyChecking=accept-new). A changed key is still refused.
    #[arg(long, global = true)]
    pub accept_new_host_keys: bool,

    #[command(subcommand)]
    pub command: Command,
}

#[derive(Args, Debug, Clone)]
pub struct EnvArgs {
    /// The environment, e.g. staging or production
    #[arg(add = ArgValueCandidates::new(environment_names))]
    pub env: String,
    /// Print one JSON document with per-host results
    #[arg(long)]
    pub json: bool,
    /// Review apps: the instance of ENV to act on, a DNS label such as pr-42 (ENV needs
    /// instances = true; push, rollback and destroy require it there)
    #[arg(long, value_name = "NAME")]
    pub instance: Option<String>,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Deploy a release to every host of an environment
    #[command(
        after_help = "Examples:\n  deployctl push staging\n  deployctl push production --artifact dist/app.tar.gz --version v1.4.2 --yes"
    )]
    Push {
        #[command(flatten)]
        env: EnvArgs,
        /// The release tarball (.tar.gz); overrides release.artifact
        #[arg(long, value_hint = ValueHint::FilePath)]
        artifact: Option<PathBuf>,
        /// Compose files to deploy (strategy = "compose"); overrides compose.files
        #[arg(
            long,
            value_name = "FILE",
            num_args = 1..,
            conflicts_with = "artifact",
            value_hint = ValueHint::FilePath
        )]
        compose: Vec<PathBuf>,
        /// A label stored with the release (a git SHA or tag); `rollback --to` accepts it.
        /// At most 128 bytes, no control characters
        #[arg(long)]
        version: Option<String>,
        /// Do not run the migrate command
        #[arg(long)]
        skip_migrations: bool,
        /// Do not ask for confirmation (environments with confirm = true)
        #[arg(long)]
        yes: bool,
        /// Wait this long for another deploy's lock (e.g. 2m) instead of failing
        #[arg(long, value_parser = parse_duration)]
        lock_wait: Option<std::time::Duration>,
        /// Push even though `promote_from` has not proven this content (recorded in the
        /// history, and loud in the output)
        #[arg(long)]
        force: bool,
        /// Upload the whole artifact even to hosts that have earlier releases (no delta)
        #[arg(long)]
        no_delta: bool,
    },
    /// Deploy to TO exactly the release that is live on FROM (same content, byte for byte)
    #[command(
        after_help = "Examples:\n  deployctl promote staging production --yes\n  deployctl promote staging production --version v1.4.2 --yes"
    )]
    Promote {
        /// Where the release is live now, e.g. staging
        #[arg(add = ArgValueCandidates::new(environment_names))]
        from: String,
        /// Where it goes, e.g. production
        #[arg(add = ArgValueCandidates::new(environment_names))]
        to: String,
        /// The release to take (a version label or id); default: what FROM runs now
        #[arg(long)]
        version: Option<String>,
        /// Do not ask for confirmation (TO has confirm = true)
        #[arg(long)]
        yes: bool,
        /// Print one JSON document with per-host results
        #[arg(long)]
        json: bool,
        #[arg(long, value_parser = parse_duration)]
        lock_wait: Option<std::time::Duration>,
    },
    /// Switch back to an earlier release (the previous one by default)
    #[command(
        after_help = "Examples:\n  deployctl rollback production\n  deployctl rollback production --to 20261122214450\n  deployctl rollback production --to v1.4.1"
    )]
    Rollback {
        #[command(flatten)]
        env: EnvArgs,
        /// A release id or a version label
        #[arg(long)]
        to: Option<String>,
        #[arg(long)]
        yes: bool,
        #[arg(long, value_parser = parse_duration)]
        lock_wait: Option<std::time::Duration>,
    },
    /// Per host: current release, version, health, last deploy
    Status {
        #[command(flatten)]
        env: EnvArgs,
    },
    /// Per host: every release, which is current, its status
    Releases {
        #[command(flatten)]
        env: EnvArgs,
    },
    /// Who deployed what, when, and how it ended
    History {
        #[command(flatten)]
        env: EnvArgs,
        /// Newest entries per host
        #[arg(long, default_value_t = 20)]
        limit: u32,
    },
    /// Review apps: stop an instance, remove its files and free its port
    #[command(
        long_about = "Stop a review-app instance of ENV on every host (its `stop` command, or `down -v --remove-orphans` for compose, which removes its volumes too), remove <deploy_to>/instances/NAME and free its port. Takes the instance's lock (--lock-wait waits for it). Destroying an instance that does not exist succeeds and says so.",
        after_help = "Examples:\n  deployctl destroy review --instance pr-42"
    )]
    Destroy {
        #[command(flatten)]
        env: EnvArgs,
        /// Do not ask for confirmation (environments with confirm = true)
        #[arg(long)]
        yes: bool,
        #[arg(long, value_parser = parse_duration)]
        lock_wait: Option<std::time::Duration>,
    },
    /// Review apps: per host, every instance with its port, release, URL and last deploy
    #[command(
        after_help = "Examples:\n  deployctl instances review\n  deployctl instances review --json"
    )]
    Instances {
        /// The environment (one with instances = true)
        #[arg(add = ArgValueCandidates::new(environment_names))]
        env: String,
        /// Print one JSON document with per-host results
        #[arg(long)]
        json: bool,
    },
    /// Reachability, host key, auth, agent version, disk space
    Check {
        #[command(flatten)]
        env: EnvArgs,
    },
    /// Install or upgrade deploy-agent, its config, group and unit on every host
    #[command(
        long_about = "Install or upgrade deploy-agent on every host of ENV, over SSH (host keys \
checked as for every command), as root or with `sudo -n`.\n\n\
Per host: uploads the agent binary (sha256-checked; it must run `--version` on the host \
before it replaces anything) to agent_bin when that is absolute, else \
/usr/local/bin/deploy-agent; writes /etc/deploy-agent/agent.toml (socket = agent_socket, \
socket_group, allowed_roots gets the parent of deploy_to; other roots and keys are kept); \
creates the group and adds the SSH user to it; installs the systemd unit (and, when the \
unit runs the agent as its own User=, creates that user and a missing deploy_to owned by \
it), then daemon-reload, enable, and start or restart when something changed. Then it checks the \
agent like `deployctl check` does, and that it runs the version just installed.\n\n\
Idempotent: only what differs (by sha256) is written, and a second run says \"up to \
date\". <deploy_to> (the agent's journal and history) is never touched.\n\n\
--no-systemd is for test rigs and containers without systemd: it installs the binary and \
config, and runs the agent as a background process (setsid nohup deploy-agent serve) whose \
pid is kept in agent.pid next to the socket, with its log in agent.log; an upgrade stops \
the old agent by that pid (never by name) and starts the new one. Nothing restarts it if \
it dies or the machine reboots. Without --no-systemd, a host without systemd is refused \
(exit 2) before anything changes.\n\n\
Exit codes: 0 ok; 1 installing or verifying failed on a host; 2 usage or configuration \
(or no systemd); 3 could not connect, authenticate, verify a host key, or use sudo.",
        after_help = "Examples:\n  deployctl bootstrap staging\n  deployctl bootstrap production --agent-binary target/x86_64-unknown-linux-musl/release/deploy-agent\n  deployctl bootstrap ci --no-systemd --prefix /tmp/rig"
    )]
    Bootstrap {
        #[command(flatten)]
        env: EnvArgs,
        /// The deploy-agent binary to install [default: the one next to deployctl]
        #[arg(long, value_name = "PATH", value_hint = ValueHint::FilePath)]
        agent_binary: Option<PathBuf>,
        /// No systemd: run the agent as a background process (test rigs, containers)
        #[arg(long)]
        no_systemd: bool,
        /// Root /etc/deploy-agent and the binary's dir under DIR on the hosts (test rigs;
        /// needs --no-systemd). agent_socket is used as configured.
        #[arg(long, value_name = "DIR")]
        prefix: Option<PathBuf>,
        /// The group that may open the agent's socket (created when missing)
        #[arg(long, value_name = "GROUP", default_value = "deploy")]
        socket_group: String,
    },
    /// Write a commented deploy.toml to start from
    #[command(
        after_help = "Examples:\n  deployctl init\n  deployctl init --app shop --config deploy/deploy.toml"
    )]
    Init {
        /// The app's name
        #[arg(long)]
        app: Option<String>,
        /// Overwrite an existing file
        #[arg(long)]
        force: bool,
    },
    /// Print a shell completion script
    #[command(
        long_about = "Print a shell completion script. The script asks deployctl (which must be on \
the PATH) for each completion, so it offers the environments of ./deploy.toml (or \
$DEPLOYCTL_CONFIG) after push, rollback, status and the others, and file names only where a \
path is expected.",
        after_help = "Examples:\n  deployctl completions bash > /etc/bash_completion.d/deployctl\n  deployctl completions zsh > \"${fpath[1]}/_deployctl\"\n  deployctl completions fish > ~/.config/fish/completions/deployctl.fish"
    )]
    Completions {
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },
    /// Print a man page (roff), or install them all with --dir
    #[command(
        long_about = "Print the man page deployctl(1), or with COMMAND the page of that command \
(deployctl-push(1), ...). --dir DIR writes every page into DIR instead, e.g. \
/usr/local/share/man/man1, and lists the files written.",
        after_help = "Examples:\n  deployctl man --dir /usr/local/share/man/man1 && man deployctl-push\n  deployctl man push | man -l -"
    )]
    Man {
        /// The command whose page to print, e.g. push [default: deployctl(1) itself]
        #[arg(value_name = "COMMAND", conflicts_with = "dir")]
        command: Option<String>,
        /// Write every page (deployctl.1, deployctl-push.1, ...) into DIR
        #[arg(long, value_name = "DIR", value_hint = ValueHint::DirPath)]
        dir: Option<PathBuf>,
    },
    /// The whole story on this machine, no server needed
    Demo {
        /// Keep the demo's directory afterwards and print where it is
        #[arg(long)]
        keep: bool,
    },
    /// The demo's tiny static web server; takes the flags of `busybox httpd -f`
    #[command(hide = true, disable_help_flag = true)]
    DemoApp {
        /// Foreground (always; accepted for compatibility)
        #[arg(short = 'f')]
        foreground: bool,
        /// [ip:]port to listen on
        #[arg(short = 'p')]
        listen: String,
        /// Directory to serve
        #[arg(short = 'h')]
        dir: PathBuf,
    },
}

pub fn parse_duration(s: &str) -> Result<std::time::Duration, String> {
    humantime::parse_duration(s).map_err(|e| format!("{s:?} is not a duration like 30s or 5m: {e}"))
}

/// Checks `push --version` (see [`proto::label::validate_label`]) before anything
/// connects: a usage error (exit 2) that does not echo a long label back (clap's own
/// value errors would).
pub fn check_label(label: Option<&str>) -> Result<(), crate::exit::Failure> {
    match label {
        Some(l) => proto::label::validate_label(l)
            .map_err(|e| crate::exit::Failure::usage(format!("--version: {e}"))),
        None => Ok(()),
    }
}

/// The environments of the config deployctl would read: `$DEPLOYCTL_CONFIG`, else
/// `./deploy.toml`. Nothing (no error) when it is missing or does not parse.
pub fn environment_names() -> Vec<CompletionCandidate> {
    let path = std::env::var_os("DEPLOYCTL_CONFIG").unwrap_or_else(|| "deploy.toml".into());
    crate::config::environments_in(Path::new(&path))
        .into_iter()
        .map(CompletionCandidate::new)
        .collect()
}

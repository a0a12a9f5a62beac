//! The command line. Parsing only: the work is in [`crate::commands`].

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

const EXAMPLES: &str = "\
Examples:
  deployctl check staging
  deployctl push staging --artifact dist/myapp.tar.gz --version \"$GITHUB_SHA\"
  deployctl push production --yes
  deployctl rollback production --to 20261122214450
  deployctl status production --json
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
        env = "DEPLOYCTL_CONFIG"
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
    pub env: String,
    /// Print one JSON document with per-host results
    #[arg(long)]
    pub json: bool,
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
        #[arg(long)]
        artifact: Option<PathBuf>,
        /// A label stored with the release (a git SHA or tag); `rollback --to` accepts it
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
    /// Reachability, host key, auth, agent version, disk space
    Check {
        #[command(flatten)]
        env: EnvArgs,
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

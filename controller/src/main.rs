//! `deployctl`: thin on purpose; see the library.

use std::io::Write;
use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    // A shell asking for completions (`COMPLETE=bash deployctl -- ...`) is answered here.
    deployctl::completion::complete_if_asked();
    let cli = deployctl::cli::Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("DEPLOYCTL_LOG")
                .unwrap_or_else(|_| "warn".into()),
        )
        .with_ansi(deployctl::output::colour_on_stderr())
        .with_writer(std::io::stderr)
        .init();
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            let _ = writeln!(
                std::io::stderr(),
                "deployctl: cannot start the runtime: {e}"
            );
            return ExitCode::from(deployctl::exit::USAGE);
        }
    };
    ExitCode::from(rt.block_on(deployctl::run(cli)))
}

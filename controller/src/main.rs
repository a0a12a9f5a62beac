//! `deployctl`: thin on purpose; see the library.

use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    let cli = deployctl::cli::Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("DEPLOYCTL_LOG")
                .unwrap_or_else(|_| "warn".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("deployctl: cannot start the runtime: {e}");
            return ExitCode::from(deployctl::exit::USAGE);
        }
    };
    let code = rt.block_on(deployctl::run(cli));
    // Never wait on a blocking task that is stuck (e.g. reading a file for an upload
    // that ended): the command's outcome is already decided.
    rt.shutdown_timeout(std::time::Duration::from_secs(2));
    ExitCode::from(code)
}

//! `deployctl`: thin on purpose; see the library.

use std::io::Write;
use std::process::ExitCode;

use clap::Parser;
use clap::error::ErrorKind;

fn main() -> ExitCode {
    // A shell asking for completions (`COMPLETE=bash deployctl -- ...`) is answered here.
    deployctl::completion::complete_if_asked();
    let cli = match deployctl::cli::Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => return usage_error(&e),
    };
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
    let code = rt.block_on(deployctl::run(cli));
    // Never wait on a blocking task that is stuck (e.g. reading a file for an upload
    // that ended): the command's outcome is already decided.
    rt.shutdown_timeout(std::time::Duration::from_secs(2));
    ExitCode::from(code)
}

/// Prints clap's message (help and --version too) and, when the environment is what is
/// missing, the environments the config defines. Never panics on a closed pipe.
fn usage_error(e: &clap::Error) -> ExitCode {
    let _ = e.print();
    let rendered = e.render().to_string();
    if e.kind() == ErrorKind::MissingRequiredArgument
        && ["<ENV>", "<FROM>", "<TO>"]
            .iter()
            .any(|a| rendered.contains(a))
    {
        let args: Vec<String> = std::env::args().collect();
        let hint = deployctl::completion::missing_environment_hint(&args);
        let _ = writeln!(std::io::stderr(), "\n{hint}");
    }
    ExitCode::from(u8::try_from(e.exit_code()).unwrap_or(deployctl::exit::USAGE))
}

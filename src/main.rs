//! Parses the command line, loads configuration, initialises logging, and
//! hands off to the subcommand.

use std::process::ExitCode;

use ai_message::{cli, config::Config, telemetry};
use clap::Parser as _;

/// mimalloc: many small short-lived allocations per call (protobuf strings,
/// rows), where it is measurably faster than glibc malloc (BENCHMARKS.md).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> ExitCode {
    let cli = cli::Cli::parse();
    // The descriptor is compiled in: no configuration or database is needed.
    if let Some(cli::Command::Descriptor { output }) = &cli.command {
        return match cli::write_descriptor(output.as_deref()) {
            Ok(()) => ExitCode::SUCCESS,
            Err(error) => {
                eprintln!("error: {error:#}");
                ExitCode::FAILURE
            }
        };
    }
    if let Err(error) = dotenvy::dotenv()
        && !error.not_found()
    {
        eprintln!("invalid configuration: .env: {error}");
        return ExitCode::from(2);
    }
    telemetry::init();
    let config = match Config::from_env() {
        Ok(config) => config,
        Err(error) => {
            eprintln!("{error}");
            return ExitCode::from(2);
        }
    };
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("cannot start the async runtime: {error}");
            return ExitCode::FAILURE;
        }
    };
    let command = cli.command.unwrap_or(cli::Command::Serve);
    match runtime.block_on(cli::run(command, config)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("error: {error:#}");
            ExitCode::FAILURE
        }
    }
}

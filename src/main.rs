//! The `metronome` binary: parse the command line, set up logging, run the command (`cli`);
//! the work lives in the library.

mod cli;

use std::io::{self, IsTerminal};
use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    let cli = match cli::Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) if !e.use_stderr() => {
            // --help and --version.
            let _ = e.print();
            return ExitCode::SUCCESS;
        }
        Err(e) => {
            // One line: clap's message without the usage block.
            let text = e.to_string();
            let message = text.split("\n\n").next().unwrap_or("invalid arguments");
            let message: Vec<&str> = message.lines().map(str::trim).filter(|l| !l.is_empty()).collect();
            eprintln!("metronome: {} (see --help)", message.join(" ").trim_start_matches("error: "));
            return ExitCode::from(2);
        }
    };
    // Logs go to stderr as text; RUST_LOG filters them (default: info; the demo talks on stdout
    // and keeps its log to warnings).
    let default_filter = if cli.is_demo() { "warn" } else { "warn,metronome=info" };
    tracing_subscriber::fmt()
        .with_writer(io::stderr)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| default_filter.into()),
        )
        .with_target(false)
        // Colour codes only for a terminal: log files and collectors get plain `key=value`.
        .with_ansi(io::stderr().is_terminal())
        .init();
    match cli.run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("metronome: {e}");
            ExitCode::FAILURE
        }
    }
}

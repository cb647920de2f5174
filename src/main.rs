//! The `ublk-mirror` command line. Exit status: 0 success, 1 failure (the message on stderr
//! says why), 2 invalid command line. Each subcommand group lives in `cli/`.

mod cli;

use clap::Parser;

// Payload buffers are allocated on connection threads and freed on the writeback thread;
// glibc's per-thread arenas answer that pattern with constant heap growing and trimming
// (mprotect). mimalloc v3 (not the crate's `v2` feature): it keeps freed memory for 1 s
// before giving it back, where v2 gave it back after 10 ms and a mirror's sender, whose batch
// buffers are freed as they are acknowledged, then faulted transparent huge pages in anew for
// each batch: 28-65% more CPU per 4 KiB record in a backlog drain (docs/architecture.md,
// measured costs).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() {
    // Anything this process makes without naming a mode is its owner's only (the modes that
    // matter are set explicitly by `permissions`; this catches what is not: docs/security.md).
    // `install-units` sets the modes of what it installs itself.
    rustix::process::umask(rustix::fs::Mode::from_raw_mode(0o077));
    let cli = cli::Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()))
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    if let Err(error) = cli::execute(cli.command) {
        eprintln!("ublk-mirror: error: {}", describe(&error));
        std::process::exit(1);
    }
}

/// The error and its causes, like `{:#}`, but without repeating a cause that a message
/// already quotes (errors that say "context: cause" and also report the cause as source).
fn describe(error: &anyhow::Error) -> String {
    let mut message = error.to_string();
    for cause in error.chain().skip(1) {
        let text = cause.to_string();
        if !message.contains(&text) {
            message.push_str(": ");
            message.push_str(&text);
        }
    }
    message
}

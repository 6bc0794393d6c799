//! What coreg's two gRPC services (`coreg-trainer serve`, `coreg-sampler serve`) share,
//! so that an operator configures, secures, probes and scrapes them the same way.

pub mod auth;
pub mod config;
pub mod metrics;
pub mod server;

/// Logs to stderr, as text or JSON lines, filtered by `RUST_LOG` (`default` when
/// unset).
pub fn init_logging(json: bool, default: &str) {
    let filter =
        tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| default.into());
    // Colour codes only on a terminal: in a file or a log collector they are noise.
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(ansi)
        .with_writer(std::io::stderr);
    if json {
        builder.json().init();
    } else {
        builder.init();
    }
}

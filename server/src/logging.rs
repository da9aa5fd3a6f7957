//! Logging: a `tracing-subscriber` fmt layer on stderr, filtered by an `EnvFilter`.
//!
//! The filter comes from the first of these that is set: `--log-level`, `RUST_LOG`, the
//! config's `broker.log_level` (default `info`).

use std::fmt;
use std::io::IsTerminal;

use tracing_subscriber::EnvFilter;

/// Which setting the log filter came from, for error messages.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FilterSource {
    CommandLine,
    Environment,
    Config,
}

impl fmt::Display for FilterSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            FilterSource::CommandLine => "--log-level",
            FilterSource::Environment => "RUST_LOG",
            FilterSource::Config => "broker.log_level",
        })
    }
}

#[derive(Debug, thiserror::Error)]
pub enum LoggingError {
    #[error("{source_name}: {error}")]
    BadFilter { source_name: FilterSource, error: tracing_subscriber::filter::ParseError },
    #[error("a global logger is already installed")]
    AlreadyInstalled,
}

/// Parses a level (`error`, `warn`, `info`, `debug`, `trace`) or any `EnvFilter` directive.
pub fn parse_filter(directive: &str) -> Result<EnvFilter, tracing_subscriber::filter::ParseError> {
    EnvFilter::try_new(directive)
}

/// Picks the filter directive by precedence: command line, then `RUST_LOG` (if non-empty), then
/// the config file.
pub fn choose_filter<'a>(
    command_line: Option<&'a str>,
    environment: Option<&'a str>,
    config: &'a str,
) -> (&'a str, FilterSource) {
    match (command_line, environment.filter(|s| !s.trim().is_empty())) {
        (Some(cli), _) => (cli, FilterSource::CommandLine),
        (None, Some(env)) => (env, FilterSource::Environment),
        (None, None) => (config, FilterSource::Config),
    }
}

/// Installs the global subscriber, writing to stderr (with colours only on a terminal).
pub fn init(command_line: Option<&str>, config: &str) -> Result<(), LoggingError> {
    let environment = std::env::var(EnvFilter::DEFAULT_ENV).ok();
    let (directive, source_name) = choose_filter(command_line, environment.as_deref(), config);
    let filter = parse_filter(directive).map_err(|error| LoggingError::BadFilter { source_name, error })?;
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .try_init()
        .map_err(|_| LoggingError::AlreadyInstalled)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn command_line_wins_over_environment_and_config() {
        assert_eq!(choose_filter(Some("debug"), Some("trace"), "warn"), ("debug", FilterSource::CommandLine));
    }

    #[test]
    fn environment_wins_over_config() {
        assert_eq!(choose_filter(None, Some("trace"), "warn"), ("trace", FilterSource::Environment));
    }

    #[test]
    fn empty_environment_falls_back_to_config() {
        assert_eq!(choose_filter(None, Some(" "), "warn"), ("warn", FilterSource::Config));
        assert_eq!(choose_filter(None, None, "warn"), ("warn", FilterSource::Config));
    }

    #[test]
    fn levels_and_directives_parse() {
        for ok in ["error", "warn", "info", "debug", "trace", "ferry_server=debug,warn"] {
            assert!(parse_filter(ok).is_ok(), "{ok}");
        }
        assert!(parse_filter("ferry=loud").is_err());
    }
}

//! Logging: a `tracing-subscriber` fmt layer on stderr or appended to a file, as text or one
//! JSON object a line, filtered by an `EnvFilter`.
//!
//! The filter comes from the first of these that is set: `--log-level`, `RUST_LOG`, the
//! config's `broker.log_level` (default `info`). The format and the file: `--log-format` and
//! `--log-file` win over `broker.log_format` and `broker.log_file`.

use std::fmt;
use std::fs::File;
use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::Arc;

use tracing_subscriber::fmt::writer::BoxMakeWriter;
use tracing_subscriber::EnvFilter;

/// How a log line is written.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    /// `2026-01-01T00:00:00.000000Z  INFO ferry_mqtt::driver: MQTT client connected conn=7 peer=…`
    #[default]
    Text,
    /// One JSON object a line: `timestamp`, `level`, `target`, and `fields` (the message and
    /// every key=value of the event), for log collectors.
    Json,
}

impl FromStr for LogFormat {
    type Err = String;
    fn from_str(s: &str) -> Result<LogFormat, String> {
        match s {
            "text" => Ok(LogFormat::Text),
            "json" => Ok(LogFormat::Json),
            other => Err(format!("{other:?}: expected \"text\" or \"json\"")),
        }
    }
}

/// Where and how to log, after the command line and the config file were weighed.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LogOutput {
    pub format: LogFormat,
    /// Appended to (created if missing); `None`: stderr.
    pub file: Option<PathBuf>,
}

impl LogOutput {
    /// The command line's choices win over the config file's, each on its own.
    pub fn choose(
        format: Option<LogFormat>,
        file: Option<&Path>,
        config_format: LogFormat,
        config_file: Option<&Path>,
    ) -> LogOutput {
        LogOutput { format: format.unwrap_or(config_format), file: file.or(config_file).map(Path::to_path_buf) }
    }
}

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
    #[error("cannot open the log file {}: {error}", path.display())]
    File { path: PathBuf, error: std::io::Error },
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

/// Opens a log file for appending, creating it if missing.
pub fn open_log_file(path: &Path) -> Result<File, LoggingError> {
    File::options()
        .create(true)
        .append(true)
        .open(path)
        .map_err(|error| LoggingError::File { path: path.to_path_buf(), error })
}

/// Installs the global subscriber, writing to `output`'s file or to stderr (with colours only
/// on a terminal, and never in JSON).
pub fn init(command_line: Option<&str>, config: &str, output: &LogOutput) -> Result<(), LoggingError> {
    let environment = std::env::var(EnvFilter::DEFAULT_ENV).ok();
    let (directive, source_name) = choose_filter(command_line, environment.as_deref(), config);
    let filter = parse_filter(directive).map_err(|error| LoggingError::BadFilter { source_name, error })?;
    let (writer, terminal) = match &output.file {
        // Each line is formatted first and written with one `write` on an O_APPEND file, so
        // lines stay whole; no lock is needed around the file.
        Some(path) => (BoxMakeWriter::new(Arc::new(open_log_file(path)?)), false),
        None => (BoxMakeWriter::new(std::io::stderr), std::io::stderr().is_terminal()),
    };
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(writer);
    match output.format {
        LogFormat::Text => builder.with_ansi(terminal).try_init(),
        LogFormat::Json => builder.json().with_ansi(false).try_init(),
    }
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
    fn command_line_output_wins_over_config_each_on_its_own() {
        let cli_file = Path::new("cli.log");
        let config_file = Path::new("/var/log/ferry.log");
        assert_eq!(
            LogOutput::choose(Some(LogFormat::Json), None, LogFormat::Text, Some(config_file)),
            LogOutput { format: LogFormat::Json, file: Some(config_file.into()) }
        );
        assert_eq!(
            LogOutput::choose(None, Some(cli_file), LogFormat::Json, Some(config_file)),
            LogOutput { format: LogFormat::Json, file: Some(cli_file.into()) }
        );
        assert_eq!(LogOutput::choose(None, None, LogFormat::Text, None), LogOutput::default());
    }

    #[test]
    fn formats_parse() {
        assert_eq!("text".parse(), Ok(LogFormat::Text));
        assert_eq!("json".parse(), Ok(LogFormat::Json));
        assert!("JSON".parse::<LogFormat>().unwrap_err().contains("expected \"text\" or \"json\""));
    }

    #[test]
    fn a_log_file_is_appended_to() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ferry.log");
        std::fs::write(&path, "kept\n").unwrap();
        use std::io::Write;
        writeln!(open_log_file(&path).unwrap(), "added").unwrap();
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "kept\nadded\n");
        let err = open_log_file(&dir.path().join("missing/ferry.log")).unwrap_err();
        assert!(err.to_string().starts_with("cannot open the log file "), "{err}");
    }

    #[test]
    fn levels_and_directives_parse() {
        for ok in ["error", "warn", "info", "debug", "trace", "ferry_server=debug,warn"] {
            assert!(parse_filter(ok).is_ok(), "{ok}");
        }
        assert!(parse_filter("ferry=loud").is_err());
    }
}

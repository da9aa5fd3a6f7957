//! The command line (clap derive).

use std::path::PathBuf;

use clap::{Parser, Subcommand};

use crate::logging::LogFormat;

/// Ferry: one broker for MQTT and AMQP.
#[derive(Debug, Parser)]
#[command(name = "ferry", version, args_conflicts_with_subcommands = true)]
pub struct Cli {
    /// The TOML configuration file. Without it Ferry serves MQTT on 127.0.0.1:1883 and AMQP on
    /// 127.0.0.1:5672 and keeps its data in ./ferry-data.
    #[arg(short, long, value_name = "FILE")]
    pub config: Option<PathBuf>,

    /// Log filter: error, warn, info, debug, trace or an EnvFilter directive. Overrides RUST_LOG
    /// and the config's broker.log_level.
    #[arg(long, global = true, value_name = "LEVEL")]
    pub log_level: Option<String>,

    /// How log lines are written: text (the default) or json (one object a line). Overrides
    /// the config's broker.log_format.
    #[arg(long, value_enum, value_name = "FORMAT")]
    pub log_format: Option<LogFormat>,

    /// Append log lines to FILE (created if missing) instead of writing them to stderr.
    /// Overrides the config's broker.log_file.
    #[arg(long, value_name = "FILE")]
    pub log_file: Option<PathBuf>,

    /// The data directory (the store), instead of the config's broker.data_dir or the default
    /// ./ferry-data. Relative to the working directory.
    #[arg(long, value_name = "DIR")]
    pub data_dir: Option<PathBuf>,

    #[command(subcommand)]
    pub command: Option<Command>,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Parse and validate FILE (including its TLS files) without starting; prints "FILE: ok".
    CheckConfig {
        #[arg(value_name = "FILE")]
        file: PathBuf,
    },
    /// Hash a password for a [[users]] table: prints its argon2id hash. The password is asked
    /// twice at the terminal (not echoed), or read as one line from standard input when that is
    /// not a terminal; never from the command line.
    Passwd {
        /// The user's name, for the ready-to-paste [[users]] table printed to stderr.
        #[arg(value_name = "NAME")]
        name: Option<String>,
    },
    /// Look at and act on a running Ferry through its management API (docs/management.md):
    /// list queues, connections, sessions…, purge or delete a queue, close a connection,
    /// export or import the definitions. Exits with 1 on any error.
    Ctl(crate::ctl::CtlArgs),
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;
    use std::path::Path;

    #[test]
    fn definition_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn config_and_log_level_parse() {
        let cli = Cli::try_parse_from(["ferry", "-c", "f.toml", "--log-level", "debug"]).unwrap();
        assert_eq!(cli.config, Some(PathBuf::from("f.toml")));
        assert_eq!(cli.log_level.as_deref(), Some("debug"));
        assert!(cli.command.is_none());
    }

    #[test]
    fn log_format_and_file_parse() {
        let cli = Cli::try_parse_from(["ferry", "--log-format", "json", "--log-file", "/var/log/ferry.log"]).unwrap();
        assert_eq!(cli.log_format, Some(LogFormat::Json));
        assert_eq!(cli.log_file.as_deref(), Some(Path::new("/var/log/ferry.log")));
        let cli = Cli::try_parse_from(["ferry"]).unwrap();
        assert_eq!((cli.log_format, cli.log_file), (None, None));
        assert!(Cli::try_parse_from(["ferry", "--log-format", "xml"]).is_err());
    }

    #[test]
    fn data_dir_parses_and_is_optional() {
        let cli = Cli::try_parse_from(["ferry", "--data-dir", "/var/lib/ferry", "-c", "f.toml"]).unwrap();
        assert_eq!(cli.data_dir.as_deref(), Some(Path::new("/var/lib/ferry")));
        assert_eq!(Cli::try_parse_from(["ferry"]).unwrap().data_dir, None);
        assert!(Cli::try_parse_from(["ferry", "--data-dir"]).is_err());
    }

    #[test]
    fn check_config_takes_a_file_and_the_global_log_level() {
        let cli = Cli::try_parse_from(["ferry", "check-config", "f.toml", "--log-level", "warn"]).unwrap();
        assert!(matches!(cli.command, Some(Command::CheckConfig { file }) if file == Path::new("f.toml")));
        assert_eq!(cli.log_level.as_deref(), Some("warn"));
    }

    #[test]
    fn passwd_takes_an_optional_name_and_no_password() {
        let cli = Cli::try_parse_from(["ferry", "passwd"]).unwrap();
        assert!(matches!(cli.command, Some(Command::Passwd { name: None })));
        let cli = Cli::try_parse_from(["ferry", "passwd", "alice"]).unwrap();
        assert!(matches!(cli.command, Some(Command::Passwd { name: Some(n) }) if n == "alice"));
        assert!(Cli::try_parse_from(["ferry", "passwd", "alice", "hunter2"]).is_err());
    }

    #[test]
    fn ctl_takes_its_options_before_or_after_the_command() {
        use crate::ctl::{CtlCommand, Format, Kind, QueueTarget};
        let cli = Cli::try_parse_from(["ferry", "ctl", "list", "queues", "--format", "json", "--url", "https://b:1"])
            .unwrap();
        let Some(Command::Ctl(args)) = cli.command else { panic!("not ctl") };
        assert_eq!((args.format, args.url.as_str(), args.timeout), (Format::Json, "https://b:1", 10));
        assert!(matches!(args.command, CtlCommand::List { kind: Kind::Queues, vhost: None }));
        let cli =
            Cli::try_parse_from(["ferry", "ctl", "-u", "ops", "purge", "queue", "orders", "--vhost", "iot"]).unwrap();
        let Some(Command::Ctl(args)) = cli.command else { panic!("not ctl") };
        assert_eq!(args.user.as_deref(), Some("ops"));
        assert!(
            matches!(args.command, CtlCommand::Purge { target: QueueTarget::Queue { name, vhost } } if name == "orders" && vhost == "iot")
        );
        assert!(Cli::try_parse_from(["ferry", "ctl", "list", "widgets"]).is_err());
        assert!(Cli::try_parse_from(["ferry", "ctl", "purge", "exchange", "x"]).is_err());
        assert!(Cli::try_parse_from(["ferry", "ctl", "--timeout", "0", "list", "queues"]).is_err());
    }
}

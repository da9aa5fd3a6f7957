//! `ferry`: parse the command line, load the configuration, run until SIGINT or SIGTERM; SIGHUP
//! reloads the configuration file (TLS certificates and keys, users, ACL and permissions).
//!
//! Exit codes: 0 after a clean shutdown, a good `check-config` or a `ctl` command done; 2 when
//! the configuration or start-up is refused (and for command-line errors, from clap); 1 for
//! anything else (a `ctl` command that failed).

use std::path::Path;
use std::process::ExitCode;

use anyhow::Context;
use clap::Parser;
use ferry_server::cli::{Cli, Command};
use ferry_server::signals::{Request, Signals};
use ferry_server::{logging, Config, Server};
use tracing::{error, info, warn};

// jemalloc, chosen by measurement (issue 18, docs/benchmarks.md "Global allocator"): issue 18's
// profile had ~24 % of the broker's CPU on glibc's malloc arena lock; against glibc, jemalloc
// took 8-16 % off the CPU per QoS 0 message for 1 MB more RSS, mimalloc as much for 10 MB more.
// Its dirty-page decay is 1 s instead of 10 s (`.cargo/config.toml`, issue 18's drain RSS), and
// its background threads purge while the broker is idle (there too).
#[cfg(feature = "jemalloc")]
#[global_allocator]
static GLOBAL: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

#[cfg(all(feature = "mimalloc", not(feature = "jemalloc")))]
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

const REFUSED: u8 = 2;

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Some(Command::CheckConfig { file }) => check_config(&file),
        Some(Command::Passwd { name }) => passwd(name.as_deref()),
        Some(Command::Ctl(args)) => match ferry_server::ctl::run(&args) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("ferry ctl: {e}");
                ExitCode::FAILURE
            }
        },
        None => run(&cli),
    }
}

/// Every problem of the file, one line each (the first after `ferry: `).
fn check_config(file: &Path) -> ExitCode {
    match ferry_server::check_file(file) {
        Ok(()) => {
            println!("{}: ok", file.display());
            ExitCode::SUCCESS
        }
        Err(e) => refused(e.into()),
    }
}

fn passwd(name: Option<&str>) -> ExitCode {
    let password = match ferry_server::passwd::read_password() {
        Ok(p) => p,
        Err(e @ ferry_server::passwd::PasswdError::Io(_)) => {
            eprintln!("ferry passwd: {e}");
            return ExitCode::FAILURE;
        }
        Err(e) => {
            eprintln!("ferry passwd: {e}");
            return ExitCode::from(REFUSED);
        }
    };
    let hash = ferry_core::auth::PasswordHash::argon2id(&password);
    println!("{hash}");
    eprintln!("{}", ferry_server::passwd::users_table(name, &hash));
    ExitCode::SUCCESS
}

fn run(cli: &Cli) -> ExitCode {
    let config_file = cli.config.as_deref();
    let mut config = match config_file.map(Config::load).unwrap_or_else(|| Ok(Config::embedded_defaults())) {
        Ok(config) => config,
        Err(e) => return refused(e.into()),
    };
    override_from_command_line(cli, &mut config);
    let output = logging::LogOutput::choose(
        cli.log_format,
        cli.log_file.as_deref(),
        config.broker.log_format,
        config.broker.log_file.as_deref(),
    );
    if let Err(e) = logging::init(cli.log_level.as_deref(), &config.broker.log_level, &output) {
        return refused(e.into());
    }
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build();
    let result = runtime.context("starting the tokio runtime").and_then(|rt| rt.block_on(serve(config, cli)));
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("ferry: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// What the command line sets over the file (and again over each reloaded file, so that a
/// reload does not see the command line's choice as a change of the file).
fn override_from_command_line(cli: &Cli, config: &mut Config) {
    if let Some(dir) = &cli.data_dir {
        config.broker.data_dir.clone_from(dir);
    }
}

async fn serve(config: Config, cli: &Cli) -> anyhow::Result<ExitCode> {
    let mut signals = Signals::install().context("installing signal handlers")?;
    let frontends = ferry_server::frontends::builtin_with(&config.mqtt, &config.amqp);
    let mut builder = Server::builder(config);
    for frontend in frontends {
        builder = builder.frontend(frontend);
    }
    let server = match builder.start().await {
        Ok(server) => server,
        Err(e) => return Ok(refused(e.into())),
    };
    info!(version = env!("CARGO_PKG_VERSION"), "ferry ready");
    let signal = loop {
        match signals.recv().await {
            Request::Shutdown(signal) => break signal,
            Request::Reload => reload(&server, cli),
        }
    };
    info!("received {signal}; shutting down");
    server.shutdown().await.context("shutting down")?;
    info!("bye");
    Ok(ExitCode::SUCCESS)
}

/// SIGHUP: loads the config file again and applies what can change while running. Never stops
/// the server: a file that no longer loads, or TLS material that does not, is logged and the
/// running settings stay.
fn reload(server: &Server, cli: &Cli) {
    let Some(path) = cli.config.as_deref() else {
        info!("received SIGHUP; running on the built-in defaults, nothing to reload");
        return;
    };
    info!("received SIGHUP; reloading {}", path.display());
    let mut config = match Config::load(path) {
        Ok(config) => config,
        Err(e) => {
            error!("reload refused, nothing changed: {e}");
            return;
        }
    };
    override_from_command_line(cli, &mut config);
    let report = match server.reload(&config) {
        Ok(report) => report,
        Err(e) => {
            for line in e.to_string().lines() {
                error!("reload: {line}");
            }
            *e.report
        }
    };
    for change in &report.needs_restart {
        warn!("reload: {change}: needs a restart, ignored until then");
    }
    let users = report.users.map_or_else(|| "users kept".to_string(), |n| format!("{n} user(s) configured"));
    let access = report.access.map_or_else(
        || "ACL and permissions kept".to_string(),
        |a| {
            format!(
                "{} ACL entr(y/ies), {} vhost and {} topic permission(s)",
                a.acl, a.permissions, a.topic_permissions
            )
        },
    );
    info!("reload done: TLS reloaded on {} listener(s), {users}, {access}", report.tls_reloaded.len());
}

fn refused(e: anyhow::Error) -> ExitCode {
    eprintln!("ferry: {e}");
    ExitCode::from(REFUSED)
}

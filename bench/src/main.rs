//! `ferry-bench`: Ferry's load generator. `ferry-bench mqtt --help` for the MQTT scenario;
//! `scripts/bench-mqtt.sh` runs it against Ferry and Mosquitto side by side
//! (see docs/benchmarks.md).

mod histogram;
mod mqtt;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

/// Load generator for Ferry and other brokers, loopback only.
#[derive(Debug, Parser)]
#[command(name = "ferry-bench", version)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// P publishers send N messages each to one topic; S subscribers receive them all.
    /// Exit code 0 when complete (or QoS 0, where loss is reported but allowed), 1 on a QoS 1/2
    /// shortfall or a connection error during the run, 2 when setting up failed.
    Mqtt(mqtt::Args),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Mqtt(args) => {
            let runtime = match tokio::runtime::Builder::new_multi_thread()
                .worker_threads(args.threads as usize)
                .enable_all()
                .build()
            {
                Ok(rt) => rt,
                Err(e) => return fail(&args, &anyhow::anyhow!("starting the runtime: {e}")),
            };
            match runtime.block_on(mqtt::run(&args)) {
                Ok(report) => {
                    if args.json {
                        match serde_json::to_string(&report) {
                            Ok(s) => println!("{s}"),
                            Err(e) => return fail(&args, &e.into()),
                        }
                    } else {
                        report.print_text();
                    }
                    ExitCode::from(report.exit_code())
                }
                Err(e) => fail(&args, &e),
            }
        }
    }
}

/// Setup failed: the reason on stderr, and with `--json` also as `{"error": ...}` on stdout.
fn fail(args: &mqtt::Args, e: &anyhow::Error) -> ExitCode {
    eprintln!("ferry-bench: {e:#}");
    if args.json {
        println!("{}", serde_json::json!({ "error": format!("{e:#}") }));
    }
    ExitCode::from(2)
}

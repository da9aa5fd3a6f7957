//! `ferry-bench`: Ferry's load generator. `ferry-bench mqtt --help` and `ferry-bench amqp --help`
//! for the scenarios; `scripts/bench-mqtt.sh` runs the MQTT one against Ferry and Mosquitto,
//! `scripts/bench-amqp.sh` the AMQP one against Ferry and RabbitMQ, side by side, and
//! `scripts/bench-persistence.sh` both with persistent messages, a steady backlog (`--rate`,
//! `--backlog`) and large stores (`--consumers 0`) (see docs/benchmarks.md).
//!
//! Layout: `mqtt.rs`, `amqp.rs`, `idle.rs`, `cross.rs`, `bridge.rs` one scenario each;
//! `steady.rs` the steady-state window (`--warmup`, `--measure`, `--sndbuf`, `--pid`) and the
//! loss check shared by `mqtt`, `amqp` and `bridge`; `histogram.rs` latency histograms and the
//! generator's CPU meter; `pacing.rs` the `--rate` schedule.

mod amqp;
mod bridge;
mod cross;
mod histogram;
mod idle;
mod mqtt;
mod pacing;
mod steady;

use std::future::Future;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use serde::Serialize;

/// Load generator for Ferry and other brokers, loopback only.
#[derive(Debug, Parser)]
#[command(name = "ferry-bench", version)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// P publishers send N messages each to one topic; S subscribers receive them all. With
    /// --measure: steady state, publishers send through --warmup and the window, then stop.
    /// Exit code 0 when complete (or QoS 0, where loss is reported but allowed), 1 on a QoS 1/2
    /// shortfall or a connection error during the run, 2 when setting up failed.
    Mqtt(mqtt::Args),
    /// P publishers send N messages each to one queue; C competing consumers receive them. With
    /// --measure: steady state, publishers send through --warmup and the window, then stop.
    /// Exit code 0 when every message was sent, received (and confirmed with --confirm), 1 on a
    /// shortfall, a nack or a connection error during the run, 2 when setting up failed.
    Amqp(amqp::Args),
    /// N idle MQTT connections (3.1.1 or 5.0, optionally one subscription each) held for a while (prints `ready <connected>` once all are
    /// connected, for sampling the broker's memory). Exit code 0 when all connected and held, 1
    /// otherwise, 2 when setting up failed (e.g. RLIMIT_NOFILE too low).
    Idle(idle::Args),
    /// MQTT publishers to topic T, one AMQP consumer on a queue bound to amq.topic with T's
    /// routing key. Exit code 0 when complete (or QoS 0), 1 on a shortfall or a connection error
    /// during the run, 2 when setting up failed.
    Cross(cross::Args),
    /// QoS 1 through a bridge: a publisher on the bridging broker, a subscriber on the remote,
    /// sequence numbers counting losses, duplicates and reordering exactly; `--mode rate` (the
    /// forwarding rate in a steady-state window, closed loop), `publish` (a backlog of N,
    /// PUBACKed) or `receive` (count N). Exit code 0 without errors (losses are reported, not
    /// errors), 1 on a connection error during the run, 2 when setting up failed.
    Bridge(bridge::Args),
}

/// What `run` needs from a scenario's report.
trait Report: Serialize {
    fn print_text(&self);
    fn exit_code(&self) -> u8;
}

impl Report for mqtt::Report {
    fn print_text(&self) {
        mqtt::Report::print_text(self)
    }
    fn exit_code(&self) -> u8 {
        mqtt::Report::exit_code(self)
    }
}

impl Report for amqp::Report {
    fn print_text(&self) {
        amqp::Report::print_text(self)
    }
    fn exit_code(&self) -> u8 {
        amqp::Report::exit_code(self)
    }
}

impl Report for idle::Report {
    fn print_text(&self) {
        idle::Report::print_text(self)
    }
    fn exit_code(&self) -> u8 {
        idle::Report::exit_code(self)
    }
}

impl Report for bridge::Report {
    fn print_text(&self) {
        bridge::Report::print_text(self)
    }
    fn exit_code(&self) -> u8 {
        bridge::Report::exit_code(self)
    }
}

impl Report for cross::Report {
    fn print_text(&self) {
        cross::Report::print_text(self)
    }
    fn exit_code(&self) -> u8 {
        cross::Report::exit_code(self)
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Mqtt(args) => run(args.threads, args.json, mqtt::run(&args)),
        Command::Amqp(args) => run(args.threads, args.json, amqp::run(&args)),
        Command::Idle(args) => run(args.threads, args.json, idle::run(&args)),
        Command::Cross(args) => run(args.threads, args.json, cross::run(&args)),
        Command::Bridge(args) => run(args.threads, args.json, bridge::run(&args)),
    }
}

/// Runs one scenario on a runtime with `threads` workers and prints its report.
fn run<R: Report>(threads: u32, json: bool, scenario: impl Future<Output = anyhow::Result<R>>) -> ExitCode {
    let runtime =
        match tokio::runtime::Builder::new_multi_thread().worker_threads(threads as usize).enable_all().build() {
            Ok(rt) => rt,
            Err(e) => return fail(json, &anyhow::anyhow!("starting the runtime: {e}")),
        };
    match runtime.block_on(scenario) {
        Ok(report) => {
            if json {
                match serde_json::to_string(&report) {
                    Ok(s) => println!("{s}"),
                    Err(e) => return fail(json, &e.into()),
                }
            } else {
                report.print_text();
            }
            ExitCode::from(report.exit_code())
        }
        Err(e) => fail(json, &e),
    }
}

/// Setup failed: the reason on stderr, and with `--json` also as `{"error": ...}` on stdout.
fn fail(json: bool, e: &anyhow::Error) -> ExitCode {
    eprintln!("ferry-bench: {e:#}");
    if json {
        println!("{}", serde_json::json!({ "error": format!("{e:#}") }));
    }
    ExitCode::from(2)
}

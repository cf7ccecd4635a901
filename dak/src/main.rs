use std::process::ExitCode;

use clap::{Parser, Subcommand};

/// mimalloc instead of the system allocator: dak allocates per message at
/// every hop, and glibc's malloc and free were a fifth of its CPU under load.
/// Built without transparent huge pages (feature `no_thp`): mimalloc
/// otherwise asks for them on its arenas, and every 2 MiB page it touches
/// counts whole; `dak up` held 443 MiB at the end of the `offline` benchmark
/// with them and 242 MiB without, at the same throughput.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// mimalloc's `purge_delay` option: how long memory freed by dak stays with
/// the process before it goes back to the system. This is its index in
/// mimalloc 3's `mi_option_t`; `libmimalloc-sys` exports no constant for it
/// (the test below pins it).
const MI_OPTION_PURGE_DELAY: libmimalloc_sys::mi_option_t = 15;

/// mimalloc 3 keeps freed memory for 1 s by default. At the end of the
/// `offline` benchmark `dak up` then held 320–344 MiB, of which about
/// 130 MiB freed and not yet returned; with 100 ms it held 244–260 MiB, and
/// the closed loop ran as fast (docs/performance.md).
const PURGE_DELAY_MS: std::ffi::c_long = 100;

/// Sets [`PURGE_DELAY_MS`], unless the operator set `MIMALLOC_PURGE_DELAY`
/// (which mimalloc reads itself).
fn return_freed_memory_sooner() {
    if std::env::var_os("MIMALLOC_PURGE_DELAY").is_some() {
        return;
    }
    // SAFETY: mi_option_set stores a number in mimalloc's table of options,
    // which it reads atomically from any thread; any delay is valid for
    // this option.
    #[allow(unsafe_code)]
    unsafe {
        libmimalloc_sys::mi_option_set(MI_OPTION_PURGE_DELAY, PURGE_DELAY_MS)
    };
}

/// dak: a Kafka-backed chat delivery pipeline.
#[derive(Parser)]
#[command(name = "dak", version)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run every service in this process, on embedded defaults unless
    /// DAK_KAFKA_BROKERS / DAK_REDIS_URL say otherwise.
    Up(Box<dak::up::UpArgs>),
    /// Mint a client token (HS256, DAK_JWT_SECRET).
    Token(dak::token::TokenArgs),
    /// Copy a data directory, while dak up runs on it, into a new directory
    /// that dak up can start on.
    Backup(dak::backup::BackupArgs),
    /// Run ws-gateway on its own.
    WsGateway(ws_gateway::standalone::Args),
    /// Run rest-gateway on its own.
    RestGateway(rest_gateway::standalone::Args),
    /// Run message-router on its own.
    MessageRouter(message_router::standalone::Args),
    /// Run session on its own.
    Session(session::standalone::Args),
    /// Run persistence on its own.
    Persistence(persistence::standalone::Args),
    /// Run group-router on its own.
    GroupRouter(group_router::standalone::Args),
    /// Run push on its own.
    Push(push::standalone::Args),
    /// Drive a running dak with simulated devices and report throughput and latency.
    Bench(dak_bench::BenchArgs),
}

fn main() -> ExitCode {
    return_freed_memory_sooner();
    let cli: Cli = match dak_runtime::process::parse_args() {
        Ok(cli) => cli,
        Err(code) => return code,
    };
    match cli.command {
        Command::Up(args) => {
            let process = args.process.clone();
            dak_runtime::process::main(&process, |shutdown| async move {
                let running = dak::up::start(*args, shutdown).await?;
                if let Some(secret) = &running.jwt_secret {
                    println!("DAK_JWT_SECRET={secret}");
                    println!("(generated for this run; set DAK_JWT_SECRET to keep tokens valid across restarts)");
                }
                println!(
                    "dak is up: ws://{}/v1/ws, http://{}/v1/messages, http://{}/v1/groups",
                    running.public_addr, running.public_addr, running.public_addr
                );
                println!(
                    "admin: http://{}/metrics /livez /readyz",
                    running.admin_addr
                );
                println!(
                    "console: http://{}/ ({}), ops: http://{}/",
                    running.public_addr,
                    if running.try_it {
                        "try-it chat on"
                    } else {
                        "try-it chat off, the page says why"
                    },
                    running.admin_addr
                );
                tracing::info!(public = %running.public_addr, admin = %running.admin_addr, bus = %running.bus.describe(), "dak up");
                Ok(dak_runtime::process::Started {
                    tasks: running.tasks,
                    // The embedded log's writer finishes its last commits
                    // when the last handle goes, after every task ended;
                    // then the data directory is let go.
                    keep_alive: running
                        .bus
                        .embedded_log()
                        .cloned()
                        .map(|log| Box::new(log) as Box<dyn Send>)
                        .into_iter()
                        .chain(
                            running
                                .data_dir_lock
                                .map(|lock| Box::new(lock) as Box<dyn Send>),
                        )
                        .collect(),
                })
            })
        }
        Command::Token(args) => match dak::token::mint(&args) {
            Ok(token) => {
                println!("{token}");
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("error: {e:#}");
                ExitCode::from(64)
            }
        },
        Command::WsGateway(args) => {
            let process = args.process.clone();
            dak_runtime::process::main(&process, |s| ws_gateway::standalone::start(args, s))
        }
        Command::RestGateway(args) => {
            let process = args.process.clone();
            dak_runtime::process::main(&process, |s| rest_gateway::standalone::start(args, s))
        }
        Command::MessageRouter(args) => {
            let process = args.process.clone();
            dak_runtime::process::main(&process, |s| message_router::standalone::start(args, s))
        }
        Command::Session(args) => {
            let process = args.process.clone();
            dak_runtime::process::main(&process, |s| session::standalone::start(args, s))
        }
        Command::Persistence(args) => {
            let process = args.process.clone();
            dak_runtime::process::main(&process, |s| persistence::standalone::start(args, s))
        }
        Command::GroupRouter(args) => {
            let process = args.process.clone();
            dak_runtime::process::main(&process, |s| group_router::standalone::start(args, s))
        }
        Command::Push(args) => {
            let process = args.process.clone();
            dak_runtime::process::main(&process, |s| push::standalone::start(args, s))
        }
        Command::Backup(args) => match dak::backup::backup(&args) {
            Ok(copied) => {
                for file in copied {
                    println!(
                        "{}: {} bytes in {} ms",
                        file.name,
                        file.bytes,
                        file.took.as_millis()
                    );
                }
                println!("copied into {}", args.to.display());
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("error: {e:#}");
                ExitCode::FAILURE
            }
        },
        Command::Bench(args) => {
            if let Err(e) = args.validate() {
                eprintln!("error: {e}");
                return ExitCode::from(64);
            }
            let runtime = match tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .build()
            {
                Ok(runtime) => runtime,
                Err(e) => {
                    eprintln!("error: starting the runtime: {e}");
                    return ExitCode::FAILURE;
                }
            };
            match runtime.block_on(dak_bench::run(args)) {
                Ok(report) => {
                    eprintln!("{}", report.summary());
                    println!("{}", report.json());
                    if report.failed() {
                        ExitCode::FAILURE
                    } else {
                        ExitCode::SUCCESS
                    }
                }
                Err(e) => {
                    eprintln!("error: {e:#}");
                    ExitCode::FAILURE
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_command_line_is_consistent() {
        use clap::CommandFactory;
        super::Cli::command().debug_assert();
    }

    /// push waits on persistence's consumer group by name.
    #[test]
    fn push_waits_on_the_group_persistence_consumes_in() {
        assert_eq!(push::STORE_GROUP, persistence::GROUP);
    }

    /// Option 15 is `purge_delay` in the mimalloc linked here: version 3,
    /// and the option holds its default in this version, 1,000 ms, until
    /// dak sets it. (Nothing else in this test process sets it; another
    /// option at 15 would not hold 1,000.)
    #[test]
    #[allow(unsafe_code)]
    fn dak_shortens_mimallocs_purge_delay() {
        use super::{return_freed_memory_sooner, MI_OPTION_PURGE_DELAY, PURGE_DELAY_MS};
        // SAFETY: these only read mimalloc's version and table of options.
        let (version, before) = unsafe {
            (
                libmimalloc_sys::mi_version(),
                libmimalloc_sys::mi_option_get(MI_OPTION_PURGE_DELAY),
            )
        };
        assert_eq!(version / 10_000, 3, "mimalloc {version}");
        assert_eq!(before, 1_000);
        return_freed_memory_sooner();
        // SAFETY: as above.
        let after = unsafe { libmimalloc_sys::mi_option_get(MI_OPTION_PURGE_DELAY) };
        assert_eq!(after, PURGE_DELAY_MS);
    }
}

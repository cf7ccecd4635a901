use clap::Parser;

fn main() -> std::process::ExitCode {
    let args = message_router::standalone::Args::parse();
    let process = args.process.clone();
    dak_runtime::process::main(&process, |shutdown| {
        message_router::standalone::start(args, shutdown)
    })
}

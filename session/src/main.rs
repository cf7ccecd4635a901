use clap::Parser;

fn main() -> std::process::ExitCode {
    let args = session::standalone::Args::parse();
    let process = args.process.clone();
    dak_runtime::process::main(&process, |shutdown| {
        session::standalone::start(args, shutdown)
    })
}

use clap::Parser;

fn main() -> std::process::ExitCode {
    let args = push::standalone::Args::parse();
    let process = args.process.clone();
    dak_runtime::process::main(&process, |shutdown| push::standalone::start(args, shutdown))
}

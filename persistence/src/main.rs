use clap::Parser;

fn main() -> std::process::ExitCode {
    let args = persistence::standalone::Args::parse();
    let process = args.process.clone();
    dak_runtime::process::main(&process, |shutdown| {
        persistence::standalone::start(args, shutdown)
    })
}

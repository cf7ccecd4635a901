use clap::Parser;

fn main() -> std::process::ExitCode {
    let args = rest_gateway::standalone::Args::parse();
    let process = args.process.clone();
    dak_runtime::process::main(&process, |shutdown| {
        rest_gateway::standalone::start(args, shutdown)
    })
}

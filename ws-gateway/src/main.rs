use clap::Parser;

fn main() -> std::process::ExitCode {
    let args = ws_gateway::standalone::Args::parse();
    let process = args.process.clone();
    dak_runtime::process::main(&process, |shutdown| {
        ws_gateway::standalone::start(args, shutdown)
    })
}

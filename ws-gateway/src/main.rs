fn main() -> std::process::ExitCode {
    let args: ws_gateway::standalone::Args = match dak_runtime::process::parse_args() {
        Ok(args) => args,
        Err(code) => return code,
    };
    let process = args.process.clone();
    dak_runtime::process::main(&process, |shutdown| {
        ws_gateway::standalone::start(args, shutdown)
    })
}

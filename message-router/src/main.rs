fn main() -> std::process::ExitCode {
    let args: message_router::standalone::Args = match dak_runtime::process::parse_args() {
        Ok(args) => args,
        Err(code) => return code,
    };
    let process = args.process.clone();
    dak_runtime::process::main(&process, |shutdown| {
        message_router::standalone::start(args, shutdown)
    })
}

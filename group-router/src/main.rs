fn main() -> std::process::ExitCode {
    let args: group_router::standalone::Args = match dak_runtime::process::parse_args() {
        Ok(args) => args,
        Err(code) => return code,
    };
    let process = args.process.clone();
    dak_runtime::process::main(&process, |shutdown| {
        group_router::standalone::start(args, shutdown)
    })
}

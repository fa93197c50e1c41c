fn main() -> std::process::ExitCode {
    wisp::cli::main()
}

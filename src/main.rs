fn main() -> std::process::ExitCode {
    tallyd::cli::main()
}

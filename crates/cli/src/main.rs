//! The `sandfleet` binary: everything lives in the library (`sandfleet_cli`).

fn main() -> std::process::ExitCode {
    sandfleet_cli::main()
}

//! The `flow-matching` command: a thin wrapper over the library's CLI module.

fn main() {
    if let Err(e) = flow_matching::cli::run(std::env::args_os()) {
        eprintln!("error: {e}");
        std::process::exit(1);
    }
}

//! Says whether the io_uring backend can run on this machine, as `--io auto` decides it at start:
//! prints `io_uring: available` and exits 0, or prints the reason and exits 1. `scripts/test.sh`
//! uses it to decide whether to run the server's integration tests on io_uring as well.

use std::io::Write;
use std::process::ExitCode;

fn main() -> ExitCode {
    let (line, code) = match imedge_server::runtime::probe_io_uring() {
        Ok(()) => ("io_uring: available".to_owned(), ExitCode::SUCCESS),
        Err(reason) => (reason.to_string(), ExitCode::FAILURE),
    };
    let _ = writeln!(std::io::stdout(), "{line}");
    code
}

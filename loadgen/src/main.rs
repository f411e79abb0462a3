//! imedge-loadgen: simulates thousands of MobileIMSDK clients against a server and reports
//! throughput, latency percentiles, loss and duplicates.
//!
//! Skeleton: scenarios, the open-loop schedule and reporting arrive with the load generator issue.

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() {
    eprintln!("imedge-loadgen: not implemented yet (see the load generator issue)");
    std::process::exit(2);
}

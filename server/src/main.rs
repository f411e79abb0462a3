//! imedge: a MobileIMSDK-compatible IM transport server.
//!
//! Skeleton: the listeners, shards and routing arrive with the server issue.

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() {
    eprintln!("imedge: the server is not implemented yet (see the server issue)");
    std::process::exit(2);
}

//! imedge-benches: criterion micro-benchmarks on in-memory bytes (see `benches/`); no library code.

//! Benchmark (not yet written).

fn main() {}

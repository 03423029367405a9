//! Benchmark support for endpoint-agent. The raw-broker and agent round-trip benchmarks arrive with the
//! benchmark issue; until then `benches/roundtrip.rs` only states that it is a placeholder.

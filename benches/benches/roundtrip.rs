//! Placeholder for the round-trip benchmark (raw broker vs agent). It measures nothing yet and says so.

fn main() {
    println!(
        "roundtrip: placeholder; the benchmark harness is not written yet (see docs/benchmarks.md)"
    );
}

"""aptp.benchmarks."""

//! sandfleet's benchmarks: commands that print figures.

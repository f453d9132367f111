//! Kernel CLOCK_MONOTONIC → Unix-epoch wall-clock conversion.

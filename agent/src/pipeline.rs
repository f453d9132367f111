//! Wires probes → events → reconstruct → aggregate → sinks.

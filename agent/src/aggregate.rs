//! Interval aggregates (mergeable histograms, counters, gauges) built from request records.

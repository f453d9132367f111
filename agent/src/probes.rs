//! Loading and attaching the eBPF programs, and the maps user space drives.

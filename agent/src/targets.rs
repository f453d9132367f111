//! Which processes to trace: `--pid`s and the owners of `--port` listeners, found in /proc.

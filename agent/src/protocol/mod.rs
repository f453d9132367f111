//! Incremental, allocation-light parsers for what flows over a traced connection.
//! They never see more than the captured prefix of each syscall, so every parser copes with
//! gaps (bytes known to exist but not captured).

pub mod http;
pub mod ndjson;
pub mod openai;
pub mod shape;
pub mod sse;

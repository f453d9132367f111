//! Shared helpers for infertap's end-to-end tests.

pub mod collector_support;

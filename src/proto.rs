//! The Protobuf wire format, generated from `proto/metronome/v1/metronome.proto` at build time.

#![allow(missing_docs, clippy::all)]

include!(concat!(env!("OUT_DIR"), "/metronome.v1.rs"));

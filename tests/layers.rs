//! The workspace's layers, as the compiler sees them: the core links no I/O runtime, the model
//! and the state crates build on the core alone, the I/O crate knows none of them, and nothing
//! below the services links the services.
//! Read from `cargo tree` (normal dependencies, this lockfile, offline).

use std::collections::BTreeSet;
use std::process::Command;

/// Every package `package` links (normal dependencies, transitively), by name.
fn linked(package: &str) -> BTreeSet<String> {
    let out = Command::new(env!("CARGO"))
        .args(["tree", "--offline", "--locked", "-e", "normal", "--prefix", "none", "--format", "{p}", "-p", package])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .expect("cargo tree runs");
    assert!(out.status.success(), "cargo tree -p {package}: {}", String::from_utf8_lossy(&out.stderr));
    let text = String::from_utf8(out.stdout).expect("cargo tree prints UTF-8");
    text.lines().filter_map(|l| l.split_whitespace().next()).map(str::to_owned).collect()
}

const IO_RUNTIMES: [&str; 6] = ["tokio", "rdkafka", "rocksdb", "tokio-postgres", "warp", "hyper"];
const SERVICES: [&str; 1] = ["metronome"];

#[test]
fn the_core_links_no_io_runtime_and_no_layer_above_it() {
    let core = linked("metronome-core");
    for forbidden in
        IO_RUNTIMES.iter().chain(&SERVICES).chain(&["metronome-io", "metronome-model", "metronome-state", "tract-onnx"])
    {
        assert!(!core.contains(*forbidden), "metronome-core links {forbidden}");
    }
}

#[test]
fn the_model_and_the_state_build_on_the_core_alone() {
    let model = linked("metronome-model");
    assert!(model.contains("metronome-core") && model.contains("tract-onnx"));
    let state = linked("metronome-state");
    for (name, deps) in [("metronome-model", &model), ("metronome-state", &state)] {
        for forbidden in IO_RUNTIMES.iter().chain(&SERVICES) {
            // The state crate is RocksDB's home; only the model must not link it.
            if name == "metronome-state" && *forbidden == "rocksdb" {
                continue;
            }
            assert!(!deps.contains(*forbidden), "{name} links {forbidden}");
        }
    }
    assert!(!state.contains("metronome-model") && !model.contains("metronome-state"), "model and state are siblings");
}

#[test]
fn the_io_crate_knows_no_keystroke_model_or_store() {
    let io = linked("metronome-io");
    assert!(io.contains("rdkafka") && io.contains("tokio-postgres") && io.contains("object_store"));
    for forbidden in SERVICES.iter().chain(&[
        "metronome-core",
        "metronome-model",
        "metronome-state",
        "tract-onnx",
        "rocksdb",
        "warp",
    ]) {
        assert!(!io.contains(*forbidden), "metronome-io links {forbidden}");
    }
    for (name, deps) in [("metronome-model", linked("metronome-model")), ("metronome-state", linked("metronome-state"))]
    {
        assert!(!deps.contains("metronome-io"), "{name} links metronome-io");
    }
}

#[test]
fn the_services_crate_links_every_layer() {
    // The check above would pass on names that never occur: the services crate shows they do.
    let services = linked("metronome");
    for layer in [
        "metronome-core",
        "metronome-io",
        "metronome-model",
        "metronome-state",
        "tokio",
        "rdkafka",
        "rocksdb",
        "tokio-postgres",
    ] {
        assert!(services.contains(layer), "metronome does not link {layer}");
    }
}

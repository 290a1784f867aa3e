//! Helpers shared by the integration tests.

#![allow(dead_code)]

use std::path::PathBuf;

/// `../shared/data/NAME`, the real human typing data. Fails loudly when it is missing: these
/// tests exist to check behaviour on real data, and CI always has it.
pub fn shared_data(name: &str) -> PathBuf {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../shared/data").join(name);
    assert!(
        path.is_file(),
        "real typing data not found at {}: clone the project beside its shared/ folder (see README, 'Data')",
        path.display()
    );
    path
}
pub mod broker;
pub mod postgres;

/// Polls `condition` until it holds, failing with `what` after the tests' patience.
pub fn wait_until(what: &str, mut condition: impl FnMut() -> bool) {
    let deadline = std::time::Instant::now() + broker::PATIENCE;
    while !condition() {
        assert!(std::time::Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(std::time::Duration::from_millis(50)); // polling interval of a condition
    }
}

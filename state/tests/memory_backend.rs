//! The shared store suite against the in-memory backend.

#[test]
fn memory_store_passes_the_store_suite() {
    metronome_state::suite::run_all(metronome_state::MemoryStore::new);
}

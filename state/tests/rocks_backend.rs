//! The RocksDB backend against the shared store suite, on disk, plus what only a disk store has.

use metronome_state::{keys, RocksResources, RocksStore, Store, WriteBatch};

#[test]
fn rocks_store_passes_the_store_suite() {
    let dir = tempfile::tempdir().unwrap();
    let resources = RocksResources::default();
    let mut n = 0;
    metronome_state::suite::run_all(|| {
        n += 1;
        RocksStore::open(dir.path().join(format!("store-{n}")), &resources).unwrap()
    });
}

#[test]
fn state_survives_reopening_and_destroy_removes_it() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("p0");
    let resources = RocksResources::default();
    {
        let mut store = RocksStore::open(&path, &resources).unwrap();
        let mut batch = WriteBatch::new();
        batch.put(keys::user_time_key(1, "u", 3).unwrap(), b"three".to_vec());
        store.write(&batch).unwrap();
    }
    let store = RocksStore::open(&path, &resources).unwrap();
    let entries = store.scan_prefix(&keys::user_prefix(1, "u").unwrap()).unwrap();
    assert_eq!(entries.len(), 1, "a write outlives the handle");
    assert_eq!(entries[0].1, b"three");
    drop(store);
    RocksStore::destroy(&path).unwrap();
    assert!(!path.exists(), "destroy removes the directory");
    let store = RocksStore::open(&path, &resources).unwrap();
    assert_eq!(store.get(&keys::user_time_key(1, "u", 3).unwrap()).unwrap(), None, "a destroyed store reopens empty");
}

#[test]
fn stores_share_one_cache_budget() {
    let dir = tempfile::tempdir().unwrap();
    let resources = RocksResources::default();
    let mut a = RocksStore::open(dir.path().join("a"), &resources).unwrap();
    let mut b = RocksStore::open(dir.path().join("b"), &resources).unwrap();
    let before = resources.cache_usage_bytes();
    let mut batch = WriteBatch::new();
    for i in 0..2_000u32 {
        batch.put(i.to_be_bytes().to_vec(), vec![7u8; 512]);
    }
    a.write(&batch).unwrap();
    b.write(&batch).unwrap();
    assert!(resources.cache_usage_bytes() > before, "memtables of both stores are charged to the shared cache");
}

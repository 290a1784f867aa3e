//! The RocksDB backend against the shared store suite, on disk, plus what only a disk store has.

use metronome_state::{keys, RocksOptions, RocksResources, RocksStore, Store, WriteBatch};

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

#[test]
fn compaction_gives_the_space_of_deleted_entries_back() {
    let dir = tempfile::tempdir().unwrap();
    let resources = RocksResources::new(RocksOptions { compression: false, ..RocksOptions::default() });
    let mut store = RocksStore::open(dir.path().join("s"), &resources).unwrap();
    let mut batch = WriteBatch::new();
    for user in 0..2000 {
        batch.put(keys::user_prefix(1, &format!("user-{user}")).unwrap(), vec![7u8; 1024]);
    }
    store.write(&batch).unwrap();
    store.flush().unwrap();
    let sst = |s: &RocksStore| s.property("rocksdb.total-sst-files-size").unwrap().unwrap();
    let full = sst(&store);
    assert!(full > 1_000_000, "2000 KiB of states on disk: {full}");
    batch.clear();
    for user in 0..1900 {
        batch.delete(keys::user_prefix(1, &format!("user-{user}")).unwrap());
    }
    store.write(&batch).unwrap();
    store.compact().unwrap();
    let after = sst(&store);
    assert!(after * 5 < full, "compaction shrinks the files: {full} -> {after} bytes");
    assert_eq!(store.scan_prefix(&[1]).unwrap().len(), 100);
}

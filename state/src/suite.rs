//! The behaviour every [`Store`] backend must show.
//!
//! Each backend's tests call [`run_all`] with a factory that opens a fresh, empty store, so the
//! in-memory twin and the on-disk backend are held to exactly the same contract. Failures panic
//! with a message naming the property, as test assertions do.

use crate::{keys, Store, WriteBatch};

/// Runs every check against stores made by `open_empty`.
pub fn run_all<S: Store>(mut open_empty: impl FnMut() -> S) {
    put_then_get(&mut open_empty());
    overwrite_and_delete(&mut open_empty());
    batch_applies_in_order(&mut open_empty());
    invalid_batch_changes_nothing(&mut open_empty());
    prefix_scan_is_sorted_and_bounded(&mut open_empty());
    delete_range_is_half_open(&mut open_empty());
    compaction_keeps_what_is_live(&mut open_empty());
}

fn compaction_keeps_what_is_live<S: Store>(store: &mut S) {
    let mut batch = WriteBatch::new();
    for t in 0..100 {
        batch.put(keys::user_time_key(1, "u", t).unwrap(), vec![t as u8; 64]);
    }
    store.write(&batch).unwrap();
    batch.clear();
    batch.delete_range(keys::user_time_key(1, "u", 0).unwrap(), keys::user_time_key(1, "u", 90).unwrap());
    batch.delete(keys::user_time_key(1, "u", 95).unwrap());
    store.write(&batch).unwrap();
    store.compact().unwrap();
    let left: Vec<u8> =
        store.scan_prefix(&keys::user_prefix(1, "u").unwrap()).unwrap().into_iter().map(|(_, v)| v[0]).collect();
    assert_eq!(left, vec![90, 91, 92, 93, 94, 96, 97, 98, 99], "compaction drops the deleted, keeps the rest");
}

fn put_then_get<S: Store>(store: &mut S) {
    assert_eq!(store.get(b"k").unwrap(), None, "empty store has no key");
    let mut batch = WriteBatch::new();
    batch.put(b"k".to_vec(), b"v".to_vec());
    store.write(&batch).unwrap();
    assert_eq!(store.get(b"k").unwrap().as_deref(), Some(&b"v"[..]), "put is readable");
    assert_eq!(store.approximate_len().unwrap(), 1, "one entry after one put");
}

fn overwrite_and_delete<S: Store>(store: &mut S) {
    let mut batch = WriteBatch::new();
    batch.put(b"k".to_vec(), b"1".to_vec());
    store.write(&batch).unwrap();
    batch.clear();
    batch.put(b"k".to_vec(), b"2".to_vec());
    store.write(&batch).unwrap();
    assert_eq!(store.get(b"k").unwrap().as_deref(), Some(&b"2"[..]), "later put wins");
    batch.clear();
    batch.delete(b"k".to_vec()).delete(b"absent".to_vec());
    store.write(&batch).unwrap();
    assert_eq!(store.get(b"k").unwrap(), None, "delete removes; absent delete is fine");
}

fn batch_applies_in_order<S: Store>(store: &mut S) {
    let mut batch = WriteBatch::new();
    batch.put(b"a".to_vec(), b"1".to_vec()).delete(b"a".to_vec()).put(b"b".to_vec(), b"2".to_vec());
    store.write(&batch).unwrap();
    assert_eq!(store.get(b"a").unwrap(), None, "ops apply in order");
    assert_eq!(store.get(b"b").unwrap().as_deref(), Some(&b"2"[..]));
}

fn invalid_batch_changes_nothing<S: Store>(store: &mut S) {
    let mut batch = WriteBatch::new();
    batch.put(b"a".to_vec(), b"1".to_vec()).delete_range(b"z".to_vec(), b"a".to_vec());
    assert!(store.write(&batch).is_err(), "reversed range is refused");
    assert_eq!(store.get(b"a").unwrap(), None, "a refused batch changes nothing");
}

fn prefix_scan_is_sorted_and_bounded<S: Store>(store: &mut S) {
    let mut batch = WriteBatch::new();
    for (user, time) in [("bob", 30), ("alice", 20), ("bob", -5), ("bobby", 1), ("bob", 7)] {
        let key = keys::user_time_key(1, user, time).unwrap();
        batch.put(key, time.to_string().into_bytes());
    }
    batch.put(keys::user_time_key(2, "bob", 0).unwrap(), b"other namespace".to_vec());
    store.write(&batch).unwrap();
    let prefix = keys::user_prefix(1, "bob").unwrap();
    let times: Vec<i64> =
        store.scan_prefix(&prefix).unwrap().iter().map(|(k, _)| keys::decode_user_time_key(k).unwrap().2).collect();
    assert_eq!(times, vec![-5, 7, 30], "one user's entries, oldest first, nobody else's");
}

fn delete_range_is_half_open<S: Store>(store: &mut S) {
    let mut batch = WriteBatch::new();
    for t in 0..10 {
        batch.put(keys::user_time_key(1, "u", t).unwrap(), vec![t as u8]);
    }
    store.write(&batch).unwrap();
    batch.clear();
    batch.delete_range(keys::user_time_key(1, "u", 2).unwrap(), keys::user_time_key(1, "u", 8).unwrap());
    store.write(&batch).unwrap();
    let left: Vec<u8> =
        store.scan_prefix(&keys::user_prefix(1, "u").unwrap()).unwrap().into_iter().map(|(_, v)| v[0]).collect();
    assert_eq!(left, vec![0, 1, 8, 9], "delete_range removes [from, to)");
}

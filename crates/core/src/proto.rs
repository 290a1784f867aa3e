//! The Protobuf wire format, generated from `proto/metronome/v1/metronome.proto` at build time.

#![allow(missing_docs, clippy::all)]

include!(concat!(env!("OUT_DIR"), "/metronome.v1.rs"));

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use prost::Message;

    fn event() -> impl Strategy<Value = KeyEvent> {
        (any::<u64>(), any::<i64>(), any::<u32>(), 0i32..4).prop_map(|(seq, t, key, action)| KeyEvent {
            user_id: "u1".into(),
            device_id: "kbd0".into(),
            session_id: "s1".into(),
            seq,
            event_time_us: t,
            key,
            action,
        })
    }

    proptest! {
        #[test]
        fn batches_round_trip(events in proptest::collection::vec(event(), 0..50)) {
            let device = Some(DeviceInfo { bus_type: 3, is_virtual: false, vendor: 0x046d, product: 0xc31c, fingerprint: "kbd0".into() });
            let batch = KeyEventBatch {
                user_id: "u1".into(),
                device_id: "kbd0".into(),
                session_id: "s1".into(),
                events,
                device,
                key_id: "u1-kbd0".into(),
                signature: vec![7; 32],
                key_sums: Some(KeySums { presses: 300, hold_by_key: Some(GroupSums { groups: 2, values: 9, sum: -1.5, sum_sq_over_n: 3.0, within: 0.25 }), ..Default::default() }),
            };
            let bytes = batch.encode_to_vec();
            prop_assert_eq!(KeyEventBatch::decode(bytes.as_slice()).unwrap(), batch);
        }

        #[test]
        fn decoding_garbage_errs_instead_of_panicking(bytes in proptest::collection::vec(any::<u8>(), 0..200)) {
            let _ = KeyEventBatch::decode(bytes.as_slice());
            let _ = Alert::decode(bytes.as_slice());
        }
    }

    #[test]
    fn alert_carries_an_optional_lstm_score() {
        let alert = Alert { alert_id: "a".into(), lstm_score: None, histogram_score: 0.9, ..Alert::default() };
        let back = Alert::decode(alert.encode_to_vec().as_slice()).unwrap();
        assert_eq!(back.lstm_score, None);
        assert_eq!(back, alert);
    }
}

//! Key encoding: `namespace | len(user) | user | time`, all big-endian.
//!
//! Byte order equals (namespace, user, time) order: the user is length-prefixed so `ab` never
//! interleaves with `abc`, and signed times are stored with the sign bit flipped so negative
//! times sort before positive ones.

/// Maximum user id length in bytes, matching the processor's schema check.
pub const MAX_USER_LEN: usize = u16::MAX as usize;

/// Errors building a key.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum KeyError {
    /// The user id is longer than [`MAX_USER_LEN`] bytes.
    #[error("user id longer than {MAX_USER_LEN} bytes")]
    UserTooLong,
    /// The encoded key is shorter or longer than its layout.
    #[error("malformed state key")]
    Malformed,
}

/// The prefix shared by every key of `user` in `namespace`.
pub fn user_prefix(namespace: u8, user: &str) -> Result<Vec<u8>, KeyError> {
    let bytes = user.as_bytes();
    if bytes.len() > MAX_USER_LEN {
        return Err(KeyError::UserTooLong);
    }
    let mut key = Vec::with_capacity(3 + bytes.len() + 8);
    key.push(namespace);
    key.extend_from_slice(&(bytes.len() as u16).to_be_bytes());
    key.extend_from_slice(bytes);
    Ok(key)
}

/// The key of `user`'s entry at `time_us` in `namespace`.
pub fn user_time_key(namespace: u8, user: &str, time_us: i64) -> Result<Vec<u8>, KeyError> {
    let mut key = user_prefix(namespace, user)?;
    key.extend_from_slice(&encode_time(time_us));
    Ok(key)
}

/// Splits a key made by [`user_time_key`] back into its parts.
pub fn decode_user_time_key(key: &[u8]) -> Result<(u8, &str, i64), KeyError> {
    let (&namespace, rest) = key.split_first().ok_or(KeyError::Malformed)?;
    if rest.len() < 2 {
        return Err(KeyError::Malformed);
    }
    let len = u16::from_be_bytes([rest[0], rest[1]]) as usize;
    let rest = &rest[2..];
    if rest.len() != len + 8 {
        return Err(KeyError::Malformed);
    }
    let user = std::str::from_utf8(&rest[..len]).map_err(|_| KeyError::Malformed)?;
    let mut time = [0u8; 8];
    time.copy_from_slice(&rest[len..]);
    Ok((namespace, user, decode_time(time)))
}

/// Big-endian with the sign bit flipped: byte order is numeric order.
pub fn encode_time(time_us: i64) -> [u8; 8] {
    ((time_us as u64) ^ (1 << 63)).to_be_bytes()
}

/// Inverse of [`encode_time`].
pub fn decode_time(bytes: [u8; 8]) -> i64 {
    (u64::from_be_bytes(bytes) ^ (1 << 63)) as i64
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn time_encoding_preserves_order(a in any::<i64>(), b in any::<i64>()) {
            prop_assert_eq!(a.cmp(&b), encode_time(a).cmp(&encode_time(b)));
            prop_assert_eq!(decode_time(encode_time(a)), a);
        }

        #[test]
        fn keys_sort_by_user_then_time(
            u1 in "[a-z]{0,6}", u2 in "[a-z]{0,6}", t1 in any::<i64>(), t2 in any::<i64>()
        ) {
            let k1 = user_time_key(1, &u1, t1).unwrap();
            let k2 = user_time_key(1, &u2, t2).unwrap();
            let expected = (u1.len(), u1.as_bytes(), t1).cmp(&(u2.len(), u2.as_bytes(), t2));
            prop_assert_eq!(k1.cmp(&k2), expected);
            let (ns, user, time) = decode_user_time_key(&k1).unwrap();
            prop_assert_eq!((ns, user, time), (1, u1.as_str(), t1));
        }

        #[test]
        fn decoding_arbitrary_bytes_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..40)) {
            let _ = decode_user_time_key(&bytes);
        }
    }

    #[test]
    fn one_user_prefix_does_not_cover_a_longer_user() {
        let short = user_prefix(0, "ab").unwrap();
        let long = user_time_key(0, "abc", 5).unwrap();
        assert!(!long.starts_with(&short));
    }

    #[test]
    fn overlong_user_is_refused() {
        let user = "x".repeat(MAX_USER_LEN + 1);
        assert_eq!(user_prefix(0, &user), Err(KeyError::UserTooLong));
    }
}

//! Compact keys for the QoS tables: a keyed 128-bit hash of (user id, fingerprint).
//!
//! Fingerprints are chosen by clients, so they are only unique per user (hazard S3): every QoS
//! table is keyed by a user id *and* a fingerprint. Keeping both strings costs ~170 bytes per
//! entry (two heap allocations and the map's slot); a [`QosKey`] is 16 bytes and needs no
//! allocation at all.
//!
//! The hash is SipHash-1-3 with a 128-bit output under a secret key ([`QosKeyHasher`]): a peer
//! that does not know the key cannot make two of its messages collide on purpose, and accidental
//! collisions are negligible (≈ n²/2¹²⁹: one in 10¹⁶ for a billion live keys). A collision would
//! make a receiver take a fresh message for a duplicate (ACKed, not delivered), the same outcome
//! as an expired window; it cannot corrupt a table.

use std::collections::hash_map::RandomState;
use std::hash::{BuildHasher, Hasher};

use siphasher::sip128::{Hasher128, SipHasher13};

/// A (user id, fingerprint) pair as a 128-bit keyed hash. Already uniformly distributed, so the
/// tables index it with [`KeyBuildHasher`] instead of hashing it again.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct QosKey(pub u128);

/// Makes [`QosKey`]s under one secret key. Keys made by different hashers are unrelated.
#[derive(Debug, Clone)]
pub struct QosKeyHasher {
    sip: SipHasher13,
}

impl QosKeyHasher {
    /// A hasher with the given secret key.
    pub fn new(k0: u64, k1: u64) -> Self {
        Self {
            sip: SipHasher13::new_with_keys(k0, k1),
        }
    }

    /// A hasher with an unpredictable key: two of std's per-process random SipHash keys (which
    /// std draws from the operating system once per thread) hash two constants. No I/O here
    /// beyond that one-time draw inside std.
    pub fn random() -> Self {
        let word = |salt: u64| {
            let mut hasher = RandomState::new().build_hasher();
            hasher.write_u64(salt);
            hasher.finish()
        };
        Self::new(word(0x716f_735f_6b30), word(0x716f_735f_6b31))
    }

    /// The key of `fp` sent by (or to) `uid`.
    pub fn key(&self, uid: &str, fp: &str) -> QosKey {
        let mut sip = self.sip;
        sip.write(uid.as_bytes());
        // 0xFF never occurs in UTF-8: ("ab", "c") and ("a", "bc") hash different inputs.
        sip.write(&[0xff]);
        sip.write(fp.as_bytes());
        QosKey(sip.finish128().as_u128())
    }
}

/// The table hasher for [`QosKey`]s: the key is already a keyed hash, so its low 64 bits are used
/// as they are (hashing it again would only cost time).
#[derive(Debug, Clone, Copy, Default)]
pub struct KeyBuildHasher;

impl BuildHasher for KeyBuildHasher {
    type Hasher = KeyHasher;

    fn build_hasher(&self) -> KeyHasher {
        KeyHasher(0)
    }
}

/// See [`KeyBuildHasher`].
#[derive(Debug, Clone, Copy, Default)]
pub struct KeyHasher(u64);

impl Hasher for KeyHasher {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        // Only reached for types other than QosKey; fold them in FNV-1a style so it still works.
        for &byte in bytes {
            self.0 = (self.0 ^ u64::from(byte)).wrapping_mul(0x0100_0000_01b3);
        }
    }

    fn write_u128(&mut self, n: u128) {
        // Truncation intended: the low half of a uniform 128-bit hash is a uniform 64-bit hash.
        self.0 ^= n as u64;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_depends_on_both_parts_and_the_boundary() {
        let h = QosKeyHasher::new(1, 2);
        assert_eq!(h.key("alice", "fp-1"), h.key("alice", "fp-1"));
        assert_ne!(h.key("alice", "fp-1"), h.key("alice", "fp-2"));
        assert_ne!(h.key("alice", "fp-1"), h.key("bob", "fp-1"));
        assert_ne!(h.key("ab", "c"), h.key("a", "bc"));
    }

    #[test]
    fn key_depends_on_the_secret() {
        let (a, b) = (QosKeyHasher::new(1, 2), QosKeyHasher::new(1, 3));
        assert_ne!(a.key("u", "f"), b.key("u", "f"));
        let (r1, r2) = (QosKeyHasher::random(), QosKeyHasher::random());
        assert_ne!(r1.key("u", "f"), r2.key("u", "f"));
    }

    #[test]
    fn table_hash_is_the_low_half() {
        let key = QosKey(0xdead_beef_0000_0000_0123_4567_89ab_cdef);
        assert_eq!(KeyBuildHasher.hash_one(key), 0x0123_4567_89ab_cdef);
    }
}

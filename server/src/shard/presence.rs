//! Who is online, readable from every core and thread: the hooks' `Api::is_online` answers at
//! once, also for users whose sessions live on another core.
//!
//! One set per shard, written only by that shard's core when a user logs in or out — never on
//! the message path, which reads the shard's own `online` table. A reader takes the read lock of
//! one set for one lookup; the only contention is a login or logout on that core at the same
//! instant. A core sees its own users exactly (it updates the set before any hook runs); another
//! core's users are seen as of their last login or logout, as in any distributed presence.

use std::collections::HashSet;
use std::sync::{PoisonError, RwLock};

use crate::shard::shard_for;

/// The online users of every shard.
#[derive(Debug)]
pub struct Presence {
    shards: Box<[RwLock<HashSet<Box<str>>>]>,
}

impl Presence {
    /// An empty table for `cores` shards.
    pub fn new(cores: usize) -> Self {
        Self {
            shards: (0..cores.max(1))
                .map(|_| RwLock::new(HashSet::new()))
                .collect(),
        }
    }

    /// Number of shards (cores) the table covers.
    pub fn cores(&self) -> usize {
        self.shards.len()
    }

    fn set(&self, uid: &str) -> Option<&RwLock<HashSet<Box<str>>>> {
        self.shards
            .get(usize::from(shard_for(uid, self.shards.len())))
    }

    /// Whether `uid` is logged in.
    pub fn is_online(&self, uid: &str) -> bool {
        self.set(uid).is_some_and(|set| {
            set.read()
                .unwrap_or_else(PoisonError::into_inner)
                .contains(uid)
        })
    }

    /// Records that `uid` logged in (called by its shard).
    pub(crate) fn insert(&self, uid: &str) {
        if let Some(set) = self.set(uid) {
            let mut set = set.write().unwrap_or_else(PoisonError::into_inner);
            if !set.contains(uid) {
                set.insert(uid.into());
            }
        }
    }

    /// Records that `uid` logged out (called by its shard).
    pub(crate) fn remove(&self, uid: &str) {
        if let Some(set) = self.set(uid) {
            set.write()
                .unwrap_or_else(PoisonError::into_inner)
                .remove(uid);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn users_of_every_shard_are_seen() {
        let presence = Presence::new(4);
        let users: Vec<String> = (0..32).map(|n| format!("user-{n}")).collect();
        for uid in &users {
            presence.insert(uid);
            presence.insert(uid);
        }
        assert!(users.iter().all(|uid| presence.is_online(uid)));
        assert!(!presence.is_online("nobody"));
        presence.remove("user-3");
        assert!(!presence.is_online("user-3"));
        assert!(presence.is_online("user-4"));
    }
}

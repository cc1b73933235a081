//! Resync bookkeeping shared by the watch implementations: what a watch has delivered, and
//! the events that bring a consumer from that to a fresh snapshot.

use std::collections::BTreeMap;

use crate::store::{KeyValue, WatchEvent};

/// The key/value state a consumer has been told about.
#[derive(Debug, Default)]
pub(crate) struct Delivered {
    known: BTreeMap<String, Vec<u8>>,
}

impl Delivered {
    /// Records an event about to be delivered.
    pub(crate) fn apply(&mut self, event: &WatchEvent) {
        match event {
            WatchEvent::Put { key, value } => {
                self.known.insert(key.clone(), value.clone());
            }
            WatchEvent::Delete { key } => {
                self.known.remove(key);
            }
            WatchEvent::Synced => {}
        }
    }

    /// Events that turn the delivered state into `snapshot`, ending with `Synced`; records them.
    pub(crate) fn resync(&mut self, snapshot: Vec<KeyValue>) -> Vec<WatchEvent> {
        let fresh: BTreeMap<String, Vec<u8>> = snapshot.into_iter().map(|kv| (kv.key, kv.value)).collect();
        let mut events: Vec<WatchEvent> = self
            .known
            .keys()
            .filter(|key| !fresh.contains_key(*key))
            .map(|key| WatchEvent::Delete { key: key.clone() })
            .collect();
        events.extend(
            fresh
                .iter()
                .filter(|(key, value)| self.known.get(*key) != Some(*value))
                .map(|(key, value)| WatchEvent::Put { key: key.clone(), value: value.clone() }),
        );
        self.known = fresh;
        events.push(WatchEvent::Synced);
        events
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn kv(key: &str, value: &str) -> KeyValue {
        KeyValue { key: key.into(), value: value.into() }
    }

    #[test]
    fn resync_emits_only_the_difference() {
        let mut d = Delivered::default();
        assert_eq!(
            d.resync(vec![kv("a", "1"), kv("b", "2")]),
            vec![
                WatchEvent::Put { key: "a".into(), value: b"1".to_vec() },
                WatchEvent::Put { key: "b".into(), value: b"2".to_vec() },
                WatchEvent::Synced
            ]
        );
        d.apply(&WatchEvent::Put { key: "c".into(), value: b"3".to_vec() });
        assert_eq!(
            d.resync(vec![kv("a", "1"), kv("b", "9")]),
            vec![
                WatchEvent::Delete { key: "c".into() },
                WatchEvent::Put { key: "b".into(), value: b"9".to_vec() },
                WatchEvent::Synced
            ]
        );
    }
}

//! The sampler's concept cache: verified concepts kept in memory, so that a request
//! for a recently used concept skips the store reads, digest checks and decoding.
//! Bounded by a byte budget and evicted least-recently-used. It holds each concept's
//! embedding and U-Net *delta*; the model's U-Net is set from the untouched base
//! weights plus the delta on every switch
//! ([`BaseModel::use_unet_delta`](coreg::base_model::BaseModel::use_unet_delta)), so no
//! number of switches drifts the base.

use std::collections::VecDeque;
use std::sync::Arc;

use coreg::artifact::manifest::Manifest;
use coreg::artifact::LoadedConcept;

/// A concept version: (name, version).
pub type ConceptKey = (String, String);

/// What a cached concept costs: the sizes of its stored blobs, which the decoded
/// tensors match within a few header bytes (all are fp32 safetensors).
pub fn concept_bytes(concept: &LoadedConcept) -> u64 {
    concept.manifest.blobs.values().map(|blob| blob.size).sum()
}

/// Concepts by version, within a byte budget.
pub type ConceptCache = ByteBudgetLru<ConceptKey, Arc<SharedConcept>>;

/// A verified concept that the gRPC tasks hold and pass around (reading only its
/// manifest) and the model thread generates with.
pub struct SharedConcept(LoadedConcept);

// The workspace denies `unsafe_code`; this is one of its two exceptions.
// SAFETY: tch marks tensors `Send` but not `Sync` because a `&Tensor` can reach
// libtorch's in-place operations. A `SharedConcept`'s tensors are never written after
// `read_concept` built them: the model thread only reads them (the embedding is
// copied, the delta is added into the U-Net's own variables), and the gRPC tasks touch
// only the plain-data manifest. Concurrent reads of an unchanging tensor, and
// libtorch's atomic reference counts, are thread-safe.
#[allow(unsafe_code)]
unsafe impl Sync for SharedConcept {}

impl SharedConcept {
    pub fn new(concept: LoadedConcept) -> Self {
        SharedConcept(concept)
    }

    pub fn manifest(&self) -> &Manifest {
        &self.0.manifest
    }

    /// The placeholder token prompts name the concept by.
    pub fn token(&self) -> &str {
        self.0.embedding.token()
    }

    /// The tensors, for the model thread (see the `Sync` note above: read, never
    /// written).
    pub fn loaded(&self) -> &LoadedConcept {
        &self.0
    }

    /// What it costs in the cache.
    pub fn bytes(&self) -> u64 {
        concept_bytes(&self.0)
    }
}

/// Values by key, each with its size in bytes; the least recently used go first when
/// a new one does not fit in the budget.
pub struct ByteBudgetLru<K, V> {
    budget_bytes: u64,
    used_bytes: u64,
    /// Most recently used first. A sampler holds a handful of concepts, so a linear
    /// scan costs nothing next to one denoising step.
    entries: VecDeque<Entry<K, V>>,
}

struct Entry<K, V> {
    key: K,
    value: V,
    bytes: u64,
}

impl<K: PartialEq + Clone, V: Clone> ByteBudgetLru<K, V> {
    pub fn new(budget_bytes: u64) -> Self {
        ByteBudgetLru {
            budget_bytes,
            used_bytes: 0,
            entries: VecDeque::new(),
        }
    }

    /// The value, now the most recently used, if cached.
    pub fn get(&mut self, key: &K) -> Option<V> {
        let position = self.entries.iter().position(|e| &e.key == key)?;
        let entry = self.entries.remove(position)?;
        let value = entry.value.clone();
        self.entries.push_front(entry);
        Some(value)
    }

    /// Keeps `value` as the most recently used, evicting the least recently used
    /// until it fits. A value larger than the whole budget is not kept (the caller
    /// still uses it for the request at hand). Returns the keys evicted.
    pub fn insert(&mut self, key: K, value: V, bytes: u64) -> Vec<K> {
        if let Some(position) = self.entries.iter().position(|e| e.key == key) {
            let old = self.entries.remove(position).expect("a listed entry");
            self.used_bytes -= old.bytes;
        }
        if bytes > self.budget_bytes {
            return Vec::new();
        }
        let mut evicted = Vec::new();
        while self.used_bytes + bytes > self.budget_bytes {
            let Some(last) = self.entries.pop_back() else {
                break;
            };
            self.used_bytes -= last.bytes;
            evicted.push(last.key);
        }
        self.used_bytes += bytes;
        self.entries.push_front(Entry { key, value, bytes });
        evicted
    }

    pub fn used_bytes(&self) -> u64 {
        self.used_bytes
    }

    /// The cached keys, most recently used first.
    pub fn keys(&self) -> Vec<K> {
        self.entries.iter().map(|e| e.key.clone()).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn keys(cache: &ByteBudgetLru<&'static str, u32>) -> Vec<&'static str> {
        cache.keys()
    }

    #[test]
    fn the_least_recently_used_go_first_when_the_budget_is_full() {
        let mut cache = ByteBudgetLru::new(100);
        assert!(cache.insert("a", 1, 40).is_empty());
        assert!(cache.insert("b", 2, 40).is_empty());
        // Using `a` makes `b` the least recently used.
        assert_eq!(cache.get(&"a"), Some(1));
        assert_eq!(cache.insert("c", 3, 40), vec!["b"]);
        assert_eq!(keys(&cache), ["c", "a"]);
        assert_eq!(cache.used_bytes(), 80);
        assert_eq!(cache.get(&"b"), None);
        // One big value may evict several.
        assert_eq!(cache.insert("d", 4, 90), vec!["a", "c"]);
        assert_eq!(keys(&cache), ["d"]);
        assert_eq!(cache.used_bytes(), 90);
    }

    #[test]
    fn a_value_over_the_budget_is_not_kept_and_evicts_nothing() {
        let mut cache = ByteBudgetLru::new(100);
        cache.insert("a", 1, 60);
        assert!(cache.insert("huge", 2, 101).is_empty());
        assert_eq!(keys(&cache), ["a"]);
        assert_eq!(cache.used_bytes(), 60);
    }

    #[test]
    fn reinserting_a_key_replaces_it_and_its_size() {
        let mut cache = ByteBudgetLru::new(100);
        cache.insert("a", 1, 60);
        cache.insert("b", 2, 30);
        assert!(cache.insert("a", 3, 70).is_empty());
        assert_eq!(keys(&cache), ["a", "b"]);
        assert_eq!(cache.get(&"a"), Some(3));
        assert_eq!(cache.used_bytes(), 100);
    }
}

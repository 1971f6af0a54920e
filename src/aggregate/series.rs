//! The series table: every live key once, with its values by interval.
//!
//! Keys stay in the table from one interval to the next, so closing an
//! interval neither rehashes nor allocates: generation `g` writes each
//! slot's value `g % 2` (its "column"), and its flush takes those values
//! while `g + 1` writes the others. One lock per shard (the shard is picked by hash bits, as
//! `DashMap` picks them), and per shard:
//!
//! - `index`: a hash table of slot ids, each with where its key's bytes
//!   start (8 bytes a bucket, hashed by key), so that a lookup reads the
//!   slot and the key's bytes at once, not one after the other;
//! - `keys`: the keys' bytes end to end (an arena; a slot knows its range);
//! - `slots`: per slot its key's range, the newest generation that wrote
//!   it, and its two values (`Option<Acc>`, 24 bytes each), one per
//!   interval parity: 64 bytes, one cache line, so that a lookup that
//!   found the slot finds its value there too.
//!
//! That is about 64 bytes a key beside its own bytes and the index, where a
//! map per interval kept a 48-byte inline key and an accumulator per key in
//! each of the two maps alive at a flush, at the load factor of each.
//!
//! Ageing: the flush of `g` evicts the keys no generation wrote since
//! `g - 1` (idle for a whole interval, as statsd's `deleteIdleStats`), and
//! compacts a shard's key bytes when more of them are dead than live; a
//! shard mostly free after a burst is rebuilt to its live keys.
//!
//! The order that keeps a column to one open generation: the flusher closes
//! intervals one at a time and drains `g` ([`Series::drain`]) before it
//! closes `g + 1`, so `g + 2` never opens while `g`'s column holds values;
//! a [`super::Generation`] dropped without its flush drains (discards) its
//! column.

use std::hash::BuildHasher;
use std::ops::Range;
use std::sync::{Mutex, MutexGuard};

use hashbrown::HashTable;

use super::KeyHasher;
use super::acc::Acc;

/// Slots a flush takes under one hold of a shard's lock: ingest into that
/// shard waits at most this many takes.
const CHUNK: usize = 4096;

/// A shard's arena is rewritten when its dead bytes pass this and its live.
const COMPACT_AT: usize = 64 * 1024;

/// A shard is rebuilt when this many of its slots, and three quarters, are
/// free.
const REBUILD_AT: usize = 4096;

/// Persistent, lock-striped table of series keys and their interval values.
pub struct Series {
    shards: Box<[Stripe]>,
    /// `64 - log2(shards)`: a hash's shard is its bits after the top 7
    /// (which the index uses for its control bytes).
    shift: u32,
    hasher: KeyHasher,
}

impl std::fmt::Debug for Series {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Series")
            .field("shards", &self.shards.len())
            .finish_non_exhaustive()
    }
}

/// A shard's lock on a cache line pair of its own (no false sharing).
#[repr(align(128))]
struct Stripe(Mutex<Shard>);

/// One shard of the table (see the module doc).
#[derive(Default)]
pub struct Shard {
    index: HashTable<Entry>,
    keys: Vec<u8>,
    slots: Vec<Slot>,
    /// Evicted slots, reused by new keys.
    free: Vec<u32>,
    /// Bytes of evicted keys still in `keys`.
    dead: usize,
}

/// An index entry: a slot id and where its key starts in `keys` (the
/// slot's `at`, kept here too so that a lookup's loads of the slot and of
/// the key do not wait one for the other).
#[derive(Clone, Copy, Debug)]
struct Entry {
    id: u32,
    at: u32,
}

/// One key: 64 bytes, a cache line of its own.
#[derive(Debug)]
#[repr(C, align(64))]
struct Slot {
    /// Where its key starts in `keys`; `u32::MAX` for a free slot.
    at: u32,
    len: u32,
    /// The newest generation that wrote a value.
    seen: u64,
    /// Its value in the interval of each parity (generation `g` writes
    /// `values[g % 2]`).
    values: [Option<Acc>; 2],
}

const _: () = assert!(std::mem::size_of::<Slot>() == 64);

const FREE: u32 = u32::MAX;

impl Default for Series {
    fn default() -> Self {
        Series::new()
    }
}

impl Series {
    /// An empty table with four shards per core, rounded up to a power of
    /// two (DashMap's default: with 8 shards on 2 cores a datagram's lines
    /// meet several to a shard, and two ingest threads rarely meet on one).
    pub fn new() -> Series {
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        let count = (cores * 4).next_power_of_two().max(2);
        Series {
            shards: (0..count).map(|_| Stripe(Mutex::default())).collect(),
            shift: 64 - count.trailing_zeros(),
            hasher: KeyHasher::default(),
        }
    }

    /// The hash of `key` (seeded: keys come from the network).
    pub fn hash(&self, key: &[u8]) -> u64 {
        self.hasher.hash_one(key)
    }

    /// Which shard holds the key of `hash`.
    pub fn shard_of(&self, hash: u64) -> usize {
        ((hash << 7) >> self.shift) as usize
    }

    /// The seeded hasher of [`Series::hash`] (for [`Shard::insert`]).
    pub fn hasher(&self) -> &KeyHasher {
        &self.hasher
    }

    pub fn shard_count(&self) -> usize {
        self.shards.len()
    }

    /// Locks shard `i` (a poisoned lock is taken over: the table holds no
    /// invariant a panic in a merge can break).
    pub fn lock(&self, i: usize) -> MutexGuard<'_, Shard> {
        self.shards[i].0.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Keys in the table, over all shards.
    pub fn len(&self) -> usize {
        (0..self.shards.len())
            .map(|i| {
                let s = self.lock(i);
                s.slots.len() - s.free.len()
            })
            .sum()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Takes generation `generation`'s values (column `generation % 2`)
    /// and gives each, with its key, to `each`, outside the shard's lock
    /// (`CHUNK` slots a hold). Then the keys written by no generation
    /// since `generation - 1` leave the table.
    pub fn drain(&self, generation: u64, mut each: impl FnMut(&[u8], Acc)) {
        let column = (generation & 1) as usize;
        let mut keys = Vec::new();
        let mut taken: Vec<(Range<usize>, Acc)> = Vec::with_capacity(CHUNK);
        for i in 0..self.shards.len() {
            let mut from = 0;
            loop {
                let done = {
                    let mut shard = self.lock(i);
                    let end = shard.slots.len().min(from + CHUNK);
                    for id in from..end {
                        if let Some(acc) = shard.slots[id].values[column].take() {
                            let key = shard.key(id);
                            let start = keys.len();
                            keys.extend_from_slice(key);
                            taken.push((start..keys.len(), acc));
                        }
                        if shard.slots[id].seen < generation {
                            shard.evict(id, &self.hasher);
                        }
                    }
                    from = end;
                    let done = end == shard.slots.len();
                    if done {
                        shard.compact(&self.hasher);
                    }
                    done
                };
                for (range, acc) in taken.drain(..) {
                    each(&keys[range], acc);
                }
                keys.clear();
                if done {
                    break;
                }
            }
        }
    }

    /// Gives every live key, with its value in column `column` if it has
    /// one, to `each`, under its shard's lock (`CHUNK` slots a hold, so
    /// ingest into a shard waits at most that long). For the census of
    /// the admin API; the table is not changed.
    pub fn scan(&self, column: usize, mut each: impl FnMut(&[u8], Option<&Acc>)) {
        for i in 0..self.shards.len() {
            let mut from = 0;
            loop {
                let shard = self.lock(i);
                let end = shard.slots.len().min(from + CHUNK);
                for id in from..end {
                    if shard.slots[id].at != FREE {
                        each(shard.key(id), shard.slots[id].values[column & 1].as_ref());
                    }
                }
                from = end;
                if end == shard.slots.len() {
                    break;
                }
            }
        }
    }

    /// The value of `key` in column `column`, for tests and tools.
    pub fn get(&self, column: usize, key: &[u8]) -> Option<ValueRef<'_>> {
        let hash = self.hash(key);
        let shard = self.lock(self.shard_of(hash));
        let id = shard.find(hash, key)?;
        shard.slots[id as usize].values[column & 1].as_ref()?;
        Some(ValueRef {
            shard,
            column: column & 1,
            id: id as usize,
        })
    }
}

/// A value in the table, with its shard locked.
pub struct ValueRef<'a> {
    shard: MutexGuard<'a, Shard>,
    column: usize,
    id: usize,
}

impl std::ops::Deref for ValueRef<'_> {
    type Target = Acc;
    fn deref(&self) -> &Acc {
        match &self.shard.slots[self.id].values[self.column] {
            Some(acc) => acc,
            None => unreachable!("a ValueRef is only made for a value"),
        }
    }
}

impl Shard {
    /// The slot id of `key` (whose hash is `hash`), if it is in the table.
    #[inline]
    pub fn find(&self, hash: u64, key: &[u8]) -> Option<u32> {
        let (keys, slots) = (&self.keys, &self.slots);
        self.index
            .find(hash, |e| {
                let bytes = keys.get(e.at as usize..e.at as usize + key.len());
                slots[e.id as usize].len as usize == key.len()
                    && bytes.is_some_and(|b| super::apply::same_key(b, key))
            })
            .map(|e| e.id)
    }

    /// The slot id and key offset of the first entry the index finds
    /// under `hash` (a candidate: its key is not compared), for a touch
    /// pass ([`Shard::touch`]); reads the index only.
    #[inline]
    pub fn candidate(&self, hash: u64) -> Option<(u32, u32)> {
        self.index.find(hash, |_| true).map(|e| (e.id, e.at))
    }

    /// Reads the first byte of the key and the value in `column` of a
    /// [`Shard::candidate`], so that a lookup soon after finds them in
    /// cache. Nothing here branches on what the loads return, so the
    /// loads of many candidates overlap.
    #[inline]
    pub fn touch(&self, (id, at): (u32, u32), column: usize) -> usize {
        let key = self.keys.get(at as usize).copied().unwrap_or(0);
        let value = self
            .slots
            .get(id as usize)
            .is_some_and(|s| s.values[column].is_some());
        usize::from(key) ^ usize::from(value)
    }

    /// Reads a timer's or set's boxed accumulator in `column` of a
    /// [`Shard::candidate`] (after [`Shard::touch`]: its slot is in cache,
    /// so a mispredicted branch on the type costs little), so that a
    /// merge soon after finds it in cache.
    #[inline]
    pub fn touch_boxed(&self, (id, _): (u32, u32), column: usize) -> usize {
        self.slots
            .get(id as usize)
            .and_then(|s| s.values[column].as_ref())
            .map_or(0, Acc::touch)
    }

    /// Slot `id`'s value in `column`, if it has one.
    #[inline]
    pub fn value(&mut self, id: u32, column: usize) -> Option<&mut Acc> {
        self.slots[id as usize].values[column].as_mut()
    }

    /// Gives slot `id` its value in `column`, written by `generation`
    /// (after the key was admitted: a key only looked up, or refused by
    /// the key limit or the memory budget, does not count as written and
    /// ages out).
    #[inline]
    pub fn put(&mut self, id: u32, column: usize, generation: u64, acc: Acc) {
        let slot = &mut self.slots[id as usize];
        slot.seen = slot.seen.max(generation);
        slot.values[column] = Some(acc);
    }

    /// Adds `key` (not in the table; its hash is `hash`) and returns its
    /// slot id; `None` when the shard's key bytes would pass 4 GiB.
    pub fn insert(&mut self, hash: u64, key: &[u8], hasher: &KeyHasher) -> Option<u32> {
        let at = u32::try_from(self.keys.len()).ok()?;
        let len = u32::try_from(key.len()).ok()?;
        at.checked_add(len).filter(|&end| end != FREE)?;
        self.keys.extend_from_slice(key);
        let slot = Slot {
            at,
            len,
            seen: 0,
            values: [None, None],
        };
        let id = match self.free.pop() {
            Some(id) => {
                self.slots[id as usize] = slot;
                id
            }
            None => {
                let id = u32::try_from(self.slots.len()).ok()?;
                self.slots.push(slot);
                id
            }
        };
        let (keys, slots) = (&self.keys, &self.slots);
        self.index.insert_unique(hash, Entry { id, at }, |e| {
            hasher.hash_one(&keys[e.at as usize..][..slots[e.id as usize].len as usize])
        });
        Some(id)
    }

    fn key(&self, id: usize) -> &[u8] {
        let s = &self.slots[id];
        &self.keys[s.at as usize..][..s.len as usize]
    }

    /// Removes slot `id`'s key when it holds no value in either column.
    fn evict(&mut self, id: usize, hasher: &KeyHasher) {
        let slot = &self.slots[id];
        if slot.at == FREE || slot.values.iter().any(Option::is_some) {
            return;
        }
        let hash = hasher.hash_one(self.key(id));
        if let Ok(entry) = self.index.find_entry(hash, |e| e.id as usize == id) {
            entry.remove();
        }
        self.dead += self.slots[id].len as usize;
        self.slots[id].at = FREE;
        self.free.push(id as u32);
    }

    /// After a drain: rebuilds the shard when most of its slots are free
    /// (a burst of keys is over), else rewrites the key bytes without the
    /// dead ones when they are most.
    fn compact(&mut self, hasher: &KeyHasher) {
        let live_slots = self.slots.len() - self.free.len();
        if self.free.len() >= REBUILD_AT && self.free.len() > 3 * live_slots {
            self.rebuild(hasher);
            return;
        }
        let live = self.keys.len() - self.dead;
        if self.dead < COMPACT_AT || self.dead < live {
            return;
        }
        let mut keys = Vec::with_capacity(live);
        for slot in self.slots.iter_mut().filter(|s| s.at != FREE) {
            let at = keys.len() as u32;
            keys.extend_from_slice(&self.keys[slot.at as usize..][..slot.len as usize]);
            slot.at = at;
        }
        for e in self.index.iter_mut() {
            e.at = self.slots[e.id as usize].at;
        }
        self.keys = keys;
        self.dead = 0;
    }
}

impl Shard {
    /// The shard again with only its live keys, renumbered, every vector
    /// and the index sized to them, so that memory a burst of keys took is
    /// given back. Slot ids change: no caller keeps one across a lock.
    fn rebuild(&mut self, hasher: &KeyHasher) {
        let live = self.slots.len() - self.free.len();
        let mut keys = Vec::with_capacity(self.keys.len() - self.dead);
        let mut slots = Vec::with_capacity(live);
        for slot in std::mem::take(&mut self.slots) {
            if slot.at == FREE {
                continue;
            }
            let at = keys.len() as u32;
            keys.extend_from_slice(&self.keys[slot.at as usize..][..slot.len as usize]);
            slots.push(Slot { at, ..slot });
        }
        let key = |s: &Slot| hasher.hash_one(&keys[s.at as usize..][..s.len as usize]);
        let mut index = HashTable::with_capacity(live);
        for (id, s) in slots.iter().enumerate() {
            let entry = Entry {
                id: id as u32,
                at: s.at,
            };
            index.insert_unique(key(s), entry, |e| key(&slots[e.id as usize]));
        }
        *self = Shard {
            index,
            keys,
            slots,
            free: Vec::new(),
            dead: 0,
        };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn counter(sum: f64) -> Acc {
        Acc::Counter { sum, samples: 1 }
    }

    fn put(t: &Series, key: &[u8], generation: u64, sum: f64) {
        let hash = t.hash(key);
        let mut shard = t.lock(t.shard_of(hash));
        let id = match shard.find(hash, key) {
            Some(id) => id,
            None => shard.insert(hash, key, &t.hasher).expect("room"),
        };
        shard.put(id, (generation & 1) as usize, generation, counter(sum));
    }

    fn drained(t: &Series, generation: u64) -> Vec<(Vec<u8>, f64)> {
        let mut out = Vec::new();
        t.drain(generation, |k, acc| {
            if let Acc::Counter { sum, .. } = acc {
                out.push((k.to_vec(), sum));
            }
        });
        out.sort_by(|a, b| a.0.cmp(&b.0));
        out
    }

    #[test]
    fn a_drain_takes_its_own_column_and_leaves_the_next_generations() {
        let t = Series::new();
        put(&t, b"a", 4, 1.0);
        put(&t, b"b", 4, 2.0);
        put(&t, b"a", 5, 10.0);
        assert_eq!(
            drained(&t, 4),
            vec![(b"a".to_vec(), 1.0), (b"b".to_vec(), 2.0)]
        );
        assert_eq!(drained(&t, 4), vec![], "taken once");
        assert_eq!(drained(&t, 5), vec![(b"a".to_vec(), 10.0)]);
    }

    #[test]
    fn a_key_idle_for_a_whole_interval_leaves_the_table_and_its_slot_is_reused() {
        let t = Series::new();
        put(&t, b"idle", 1, 1.0);
        put(&t, b"busy", 1, 1.0);
        drained(&t, 1);
        put(&t, b"busy", 2, 1.0);
        assert_eq!(t.len(), 2, "seen in the interval just flushed: kept");
        drained(&t, 2);
        assert_eq!(t.len(), 1, "idle through generation 2: gone");
        assert!(t.get(0, b"idle").is_none() && t.get(1, b"idle").is_none());
        // A new key of idle's shard takes idle's slot.
        let shard = t.shard_of(t.hash(b"idle"));
        let new = (0..)
            .map(|k| format!("new.{k}").into_bytes())
            .find(|k| t.shard_of(t.hash(k)) == shard)
            .expect("a key of that shard");
        let slots = t.lock(shard).slots.len();
        put(&t, &new, 3, 5.0);
        assert_eq!(t.len(), 2);
        assert_eq!(t.lock(shard).slots.len(), slots, "a free slot is reused");
        assert_eq!(drained(&t, 3), vec![(new, 5.0)]);
    }

    #[test]
    fn the_memory_of_a_burst_of_keys_is_given_back_once_it_is_over() {
        let t = Series::new();
        for k in 0..50_000u64 {
            put(&t, format!("burst.{k}").as_bytes(), 1, 1.0);
        }
        put(&t, b"stays", 1, 1.0);
        drained(&t, 1);
        let capacity = |t: &Series| -> usize {
            (0..t.shard_count())
                .map(|i| {
                    let s = t.lock(i);
                    s.slots.capacity() + s.index.capacity()
                })
                .sum()
        };
        assert!(capacity(&t) > 100_000);
        put(&t, b"stays", 2, 2.0);
        drained(&t, 2);
        assert_eq!(t.len(), 1);
        assert!(capacity(&t) < 1_000, "{}", capacity(&t));
        put(&t, b"stays", 3, 3.0);
        put(&t, b"new", 3, 4.0);
        assert_eq!(
            drained(&t, 3),
            vec![(b"new".to_vec(), 4.0), (b"stays".to_vec(), 3.0)]
        );
    }

    #[test]
    fn churned_keys_are_compacted_and_the_live_ones_still_found() {
        let t = Series::new();
        for g in 1..=40u64 {
            for k in 0..2_000u64 {
                put(&t, format!("churn.{g}.{k:040}").as_bytes(), g, 1.0);
            }
            put(&t, b"stays", g, g as f64);
            assert_eq!(drained(&t, g).len(), 2_001);
            // Found where it is, and not added again, after a compaction.
            for key in [
                b"stays".to_vec(),
                format!("churn.{g}.{:040}", 7).into_bytes(),
            ] {
                let hash = t.hash(&key);
                let found = t.lock(t.shard_of(hash)).find(hash, &key);
                assert!(found.is_some(), "interval {g}: {key:?}");
            }
        }
        let bytes: usize = (0..t.shard_count()).map(|i| t.lock(i).keys.len()).sum();
        assert!(
            bytes < 4 * 2_000 * 50 + 4 * COMPACT_AT * t.shard_count(),
            "{bytes}"
        );
        assert_eq!(t.len(), 2_001, "the last generation's keys and `stays`");
        put(&t, b"stays", 41, 3.0);
        assert_eq!(drained(&t, 41), vec![(b"stays".to_vec(), 3.0)]);
    }
}

//! Gradient communication planner: buckets, size classes, ready order, priorities, shard assignment.
//!
//! Everything here is a pure function of per-parameter metadata (bytes, a dtype/device key id, a
//! sparse flag) and a walk order, so every rank computes the same plan. Two bucket modes:
//! - DDP-compatible ([`assign_buckets`] with `classes = None`): exactly torch's
//!   `_compute_bucket_assignment_by_size` (per key, close a bucket once its bytes reach the limit;
//!   limits advance from the first bucket's to the cap), leftovers in first-seen order.
//! - native (`classes = Some(..)`): parameters below the first size-class bound are fused as above;
//!   larger ones get a bucket of their own, in walk order, tagged with their class.

use std::cmp::Reverse;
use std::collections::BinaryHeap;

use crate::CoreError;

/// Buckets in launch order, as CSR: bucket `b` holds `indices[offsets[b]..offsets[b + 1]]`.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Buckets {
    pub indices: Vec<i64>,
    pub offsets: Vec<i64>,
    /// The size limit the bucket was filled against (0 for sparse and single large buckets).
    pub limits: Vec<u64>,
    /// Size class of each bucket: 0 for fused buckets, `c` for a lone parameter in class `c`.
    pub classes: Vec<u8>,
}

impl Buckets {
    pub fn len(&self) -> usize {
        self.limits.len()
    }
    pub fn is_empty(&self) -> bool {
        self.limits.is_empty()
    }
    pub fn bucket(&self, b: usize) -> &[i64] {
        &self.indices[self.offsets[b] as usize..self.offsets[b + 1] as usize]
    }
}

/// Inputs of [`assign_buckets`]; all per-parameter slices are indexed by parameter index.
#[derive(Debug, Clone, Copy)]
pub struct BucketArgs<'a> {
    pub nbytes: &'a [u64],
    /// A small integer per distinct (dtype, device); buckets never mix keys.
    pub keys: &'a [u32],
    /// Parameters whose gradients are sparse: one bucket each (as DDP).
    pub sparse: &'a [bool],
    /// Walk order (gradient-ready order): the parameter labels in the order they are visited.
    pub order: &'a [i64],
    /// torch's convention with `tensor_indices`: position `j`'s size/key is read at `j` (the caller
    /// passed tensors already permuted) and labelled `order[j]`. Otherwise read at `order[j]`.
    pub positional: bool,
    /// Consecutive bucket limits in bytes (the first bucket's, then the cap; the last repeats).
    pub limits: &'a [u64],
    /// Sort buckets by their smallest label (torch does so when no `tensor_indices` are given).
    pub sort_by_min: bool,
    /// Native mode: ascending size-class bounds in bytes; a parameter of `>= classes[0]` bytes is
    /// reduced alone, in class `1 + (number of bounds <= its bytes) - 1`.
    pub classes: Option<&'a [u64]>,
}

/// Size class of `nbytes` against ascending `bounds`: the number of bounds `<= nbytes`.
pub fn size_class(nbytes: u64, bounds: &[u64]) -> u8 {
    bounds.iter().take_while(|&&b| b <= nbytes).count() as u8
}

fn check_order(order: &[i64], n: usize) -> Result<(), CoreError> {
    if order.len() != n {
        return Err(CoreError::LengthMismatch { arg: "ready_order", expected: n, got: order.len() });
    }
    let mut seen = vec![false; n];
    for &i in order {
        if i < 0 || i as usize >= n || std::mem::replace(&mut seen[i as usize], true) {
            return Err(CoreError::Invalid {
                arg: "ready_order",
                why: format!("must be a permutation of range({n}); {i} is out of range or repeated"),
            });
        }
    }
    Ok(())
}

/// Plan buckets (see the module docs). Errors name the argument at fault.
pub fn assign_buckets(a: &BucketArgs<'_>) -> Result<Buckets, CoreError> {
    let n = a.nbytes.len();
    for (arg, len) in [("keys", a.keys.len()), ("sparse", a.sparse.len())] {
        if len != n {
            return Err(CoreError::LengthMismatch { arg, expected: n, got: len });
        }
    }
    check_order(a.order, n)?;
    if a.limits.is_empty() || a.limits.contains(&0) {
        return Err(CoreError::Invalid { arg: "bucket_cap_mb", why: "bucket limits must be > 0 bytes".into() });
    }
    if let Some(c) = a.classes {
        if c.is_empty() || c.contains(&0) || c.windows(2).any(|w| w[0] >= w[1]) {
            return Err(CoreError::Invalid {
                arg: "size_classes_mb",
                why: "must be non-empty, positive and strictly increasing".into(),
            });
        }
    }
    let n_keys = a.keys.iter().map(|&k| k as usize + 1).max().unwrap_or(0);
    // Per key: open bucket (indices, bytes, current limit position), first position seen.
    struct Acc {
        idx: Vec<i64>,
        bytes: u64,
        li: usize,
        first: usize,
    }
    let mut acc: Vec<Acc> = (0..n_keys).map(|_| Acc { idx: Vec::new(), bytes: 0, li: 0, first: usize::MAX }).collect();
    // (sort key: closing position, indices, limit, class)
    let mut out: Vec<(usize, Vec<i64>, u64, u8)> = Vec::new();
    for (j, &label) in a.order.iter().enumerate() {
        let src = if a.positional { j } else { label as usize };
        let nb = a.nbytes[src];
        if a.sparse[src] {
            out.push((j, vec![label], 0, 0));
            continue;
        }
        if let Some(bounds) = a.classes {
            let c = size_class(nb, bounds);
            if c > 0 {
                out.push((j, vec![label], 0, c));
                continue;
            }
        }
        let k = &mut acc[a.keys[src] as usize];
        if k.idx.is_empty() {
            k.first = j;
        }
        k.idx.push(label);
        k.bytes += nb;
        let limit = a.limits[k.li];
        if k.bytes >= limit {
            out.push((j, std::mem::take(&mut k.idx), limit, 0));
            k.bytes = 0;
            k.li = (k.li + 1).min(a.limits.len() - 1);
        }
    }
    // Leftover open buckets go last, in the order their first parameter was seen (torch: hash-map order).
    let mut left: Vec<(usize, Vec<i64>, u64, u8)> = acc
        .into_iter()
        .filter(|k| !k.idx.is_empty())
        .map(|k| (k.first, k.idx, a.limits[k.li], 0))
        .collect();
    left.sort_by_key(|r| r.0);
    out.extend(left);
    if a.sort_by_min {
        out.sort_by_key(|r| r.1.iter().copied().min().unwrap_or(i64::MAX));
    }
    let mut b = Buckets { offsets: vec![0], ..Default::default() };
    for (_, idx, limit, class) in out {
        b.indices.extend_from_slice(&idx);
        b.offsets.push(b.indices.len() as i64);
        b.limits.push(limit);
        b.classes.push(class);
    }
    Ok(b)
}

/// Split `numel` elements into `ceil(nbytes / chunk_bytes)` near-equal contiguous chunks: the
/// element offsets (len = chunks + 1). `chunk_bytes == 0` means one chunk.
pub fn chunk_bounds(numel: u64, nbytes: u64, chunk_bytes: u64) -> Vec<u64> {
    let chunks = if chunk_bytes == 0 || numel == 0 { 1 } else { nbytes.div_ceil(chunk_bytes).clamp(1, numel) };
    (0..=chunks).map(|c| (numel as u128 * c as u128 / chunks as u128) as u64).collect()
}

/// ByteScheduler-style priorities: rank of each bucket by the smallest parameter index it holds
/// (0 = needed first by the next forward). Ties cannot happen: buckets are disjoint.
pub fn priorities(b: &Buckets) -> Vec<u32> {
    let mins: Vec<i64> = (0..b.len()).map(|i| b.bucket(i).iter().copied().min().unwrap_or(i64::MAX)).collect();
    let mut order: Vec<usize> = (0..b.len()).collect();
    order.sort_by_key(|&i| (mins[i], i));
    let mut prio = vec![0u32; b.len()];
    for (r, i) in order.into_iter().enumerate() {
        prio[i] = r as u32;
    }
    prio
}

/// ZeRO-style shard assignment: each item to a rank, largest first to the least loaded rank
/// (LPT; ties to the lower item index / lower rank). Returns owners and per-rank loads.
pub fn assign_shards(nbytes: &[u64], world: usize) -> Result<(Vec<u32>, Vec<u64>), CoreError> {
    if world == 0 {
        return Err(CoreError::Invalid { arg: "world_size", why: "must be >= 1, got 0".into() });
    }
    let mut items: Vec<usize> = (0..nbytes.len()).collect();
    items.sort_by_key(|&i| (Reverse(nbytes[i]), i));
    let mut heap: BinaryHeap<Reverse<(u64, usize)>> = (0..world).map(|r| Reverse((0, r))).collect();
    let mut owner = vec![0u32; nbytes.len()];
    let mut load = vec![0u64; world];
    for i in items {
        let Reverse((l, r)) = heap.pop().expect("world >= 1");
        owner[i] = r as u32;
        load[r] = l + nbytes[i];
        heap.push(Reverse((load[r], r)));
    }
    Ok((owner, load))
}

/// max / mean of `loads` (1.0 when everything is empty).
pub fn imbalance(loads: &[u64]) -> f64 {
    let total: u64 = loads.iter().sum();
    if total == 0 {
        return 1.0;
    }
    *loads.iter().max().unwrap() as f64 * loads.len() as f64 / total as f64
}

/// 64-bit FNV-1a, fed field by field: the plan fingerprint ranks compare at start-up.
#[derive(Debug, Clone, Copy)]
pub struct Fingerprint(u64);

impl Default for Fingerprint {
    fn default() -> Self {
        Fingerprint(0xcbf2_9ce4_8422_2325)
    }
}

impl Fingerprint {
    pub fn bytes(&mut self, data: &[u8]) -> &mut Self {
        for &x in data {
            self.0 ^= x as u64;
            self.0 = self.0.wrapping_mul(0x0000_0100_0000_01b3);
        }
        self
    }
    pub fn u64(&mut self, v: u64) -> &mut Self {
        self.bytes(&v.to_le_bytes())
    }
    pub fn finish(&self) -> u64 {
        self.0
    }
}

/// Fingerprint of a plan: per bucket, its (index, bytes, key name) triples and class.
/// `key_names[k]` must be rank-independent (dtype and device *type*, not the device index).
pub fn fingerprint(b: &Buckets, nbytes: &[u64], keys: &[u32], key_names: &[&str]) -> Result<u64, CoreError> {
    let mut h = Fingerprint::default();
    h.u64(b.len() as u64);
    for i in 0..b.len() {
        h.u64(b.classes[i] as u64).u64(b.limits[i]);
        for &p in b.bucket(i) {
            let p = p as usize;
            if p >= nbytes.len() || p >= keys.len() {
                return Err(CoreError::Invalid { arg: "plan", why: format!("parameter index {p} out of range") });
            }
            let name = key_names.get(keys[p] as usize).ok_or_else(|| CoreError::Invalid {
                arg: "keys",
                why: format!("key id {} has no name", keys[p]),
            })?;
            h.u64(p as u64).u64(nbytes[p]).bytes(name.as_bytes()).u64(0xff);
        }
        h.u64(u64::MAX);
    }
    Ok(h.finish())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A direct transcription of torch's C++ `compute_bucket_assignment_by_size` (reducer.cpp), with
    /// leftovers in first-seen order instead of hash-map order.
    fn torch_ref(nbytes: &[u64], keys: &[u32], limits: &[u64], idx: Option<&[i64]>) -> Vec<Vec<i64>> {
        use std::collections::HashMap;
        let mut result: Vec<Vec<i64>> = Vec::new();
        let mut open: HashMap<u32, (Vec<i64>, u64)> = HashMap::new();
        let mut it: HashMap<u32, usize> = HashMap::new();
        let mut seen: Vec<u32> = Vec::new();
        for i in 0..nbytes.len() {
            let label = idx.map_or(i as i64, |x| x[i]);
            let k = keys[i];
            if !seen.contains(&k) {
                seen.push(k);
            }
            let e = open.entry(k).or_default();
            if e.0.is_empty() {
                // first-seen order of the *open* bucket, as ours
                seen.retain(|&s| s != k);
                seen.push(k);
            }
            e.0.push(label);
            e.1 += nbytes[i];
            let li = it.entry(k).or_insert(0);
            if e.1 >= limits[*li] {
                result.push(std::mem::take(&mut e.0));
                e.1 = 0;
                *li = (*li + 1).min(limits.len() - 1);
            }
        }
        for k in seen {
            if let Some((v, _)) = open.remove(&k) {
                if !v.is_empty() {
                    result.push(v);
                }
            }
        }
        if idx.is_none() {
            result.sort_by_key(|v| *v.iter().min().unwrap());
        }
        result
    }

    fn lcg(seed: &mut u64) -> u64 {
        *seed = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        *seed >> 33
    }

    fn all(b: &Buckets) -> Vec<Vec<i64>> {
        (0..b.len()).map(|i| b.bucket(i).to_vec()).collect()
    }

    #[test]
    fn ddp_mode_equals_torch_transcription() {
        let mut s = 7u64;
        for case in 0..300 {
            let n = 1 + (lcg(&mut s) % 60) as usize;
            let nbytes: Vec<u64> = (0..n).map(|_| 1 + lcg(&mut s) % 2_000_000).collect();
            let keys: Vec<u32> = (0..n).map(|_| (lcg(&mut s) % 3) as u32).collect();
            let limits = [1 + lcg(&mut s) % 3_000_000, 1 + lcg(&mut s) % 5_000_000];
            let sparse = vec![false; n];
            let natural: Vec<i64> = (0..n as i64).collect();
            let args = BucketArgs {
                nbytes: &nbytes,
                keys: &keys,
                sparse: &sparse,
                order: &natural,
                positional: true,
                limits: &limits,
                sort_by_min: true,
                classes: None,
            };
            assert_eq!(all(&assign_buckets(&args).unwrap()), torch_ref(&nbytes, &keys, &limits, None), "case {case}");
            let mut perm = natural.clone();
            for i in (1..n).rev() {
                perm.swap(i, (lcg(&mut s) % (i as u64 + 1)) as usize);
            }
            let args = BucketArgs { order: &perm, sort_by_min: false, ..args };
            let got = assign_buckets(&args).unwrap();
            assert_eq!(all(&got), torch_ref(&nbytes, &keys, &limits, Some(&perm)), "case {case} permuted");
            // every parameter exactly once, keys never mixed
            let mut flat = got.indices.clone();
            flat.sort();
            assert_eq!(flat, natural);
            for b in 0..got.len() {
                let kb: Vec<u32> = got.bucket(b).iter().map(|&j| keys[perm.iter().position(|&x| x == j).unwrap()]).collect();
                assert!(kb.windows(2).all(|w| w[0] == w[1]));
            }
        }
    }

    #[test]
    fn non_positional_reads_sizes_by_label() {
        // reverse walk of [10, 20, 30] with limit 25: 30 closes alone, then 20+10 left over
        let nbytes = [10, 20, 30];
        let keys = [0, 0, 0];
        let sparse = [false; 3];
        let order = [2, 1, 0];
        let args = BucketArgs {
            nbytes: &nbytes,
            keys: &keys,
            sparse: &sparse,
            order: &order,
            positional: false,
            limits: &[25],
            sort_by_min: false,
            classes: None,
        };
        assert_eq!(all(&assign_buckets(&args).unwrap()), vec![vec![2], vec![1, 0]]);
        let args = BucketArgs { positional: true, ..args };
        // positional: sizes 10, 20 (sum 30 >= 25) close, then 30 alone
        assert_eq!(all(&assign_buckets(&args).unwrap()), vec![vec![2, 1], vec![0]]);
    }

    #[test]
    fn size_classes_put_large_params_alone() {
        let mb = 1u64 << 20;
        let nbytes = [mb, 20 * mb, 2 * mb, 100 * mb, 300 * mb, 3 * mb];
        let keys = [0; 6];
        let sparse = [false, false, false, false, false, true];
        let order: Vec<i64> = (0..6).rev().collect();
        let bounds = [16 * mb, 64 * mb, 256 * mb];
        let args = BucketArgs {
            nbytes: &nbytes,
            keys: &keys,
            sparse: &sparse,
            order: &order,
            positional: false,
            limits: &[25 * mb],
            sort_by_min: false,
            classes: Some(&bounds),
        };
        let b = assign_buckets(&args).unwrap();
        assert_eq!(all(&b), vec![vec![5], vec![4], vec![3], vec![1], vec![2, 0]]);
        assert_eq!(b.classes, vec![0, 3, 2, 1, 0]);
        assert_eq!([size_class(16 * mb - 1, &bounds), size_class(16 * mb, &bounds)], [0, 1]);
        assert_eq!(priorities(&b), vec![4, 3, 2, 1, 0]);
    }

    #[test]
    fn bad_input_is_an_error_naming_the_argument() {
        let args = BucketArgs {
            nbytes: &[1, 2],
            keys: &[0, 0],
            sparse: &[false, false],
            order: &[0, 0],
            positional: false,
            limits: &[10],
            sort_by_min: false,
            classes: None,
        };
        assert!(assign_buckets(&args).unwrap_err().to_string().contains("ready_order"));
        let args = BucketArgs { order: &[0, 1], limits: &[0], ..args };
        assert!(assign_buckets(&args).unwrap_err().to_string().contains("bucket_cap_mb"));
        let args = BucketArgs { limits: &[5], classes: Some(&[4, 4]), ..args };
        assert!(assign_buckets(&args).unwrap_err().to_string().contains("size_classes_mb"));
        let args = BucketArgs { classes: None, keys: &[0], ..args };
        assert!(assign_buckets(&args).unwrap_err().to_string().contains("keys"));
        assert!(assign_shards(&[1], 0).unwrap_err().to_string().contains("world_size"));
    }

    #[test]
    fn shards_are_lpt_and_balanced() {
        let (owner, load) = assign_shards(&[100, 90, 80, 70, 10, 10, 5], 3).unwrap();
        assert_eq!(owner, vec![0, 1, 2, 2, 1, 0, 1]);
        assert_eq!(load, vec![110, 105, 150]);
        assert!((imbalance(&load) - 150.0 / 365.0 * 3.0).abs() < 1e-12);
        assert_eq!(imbalance(&[0, 0]), 1.0);
    }

    #[test]
    fn chunks_cover_the_tensor() {
        assert_eq!(chunk_bounds(10, 40, 16), vec![0, 3, 6, 10]);
        assert_eq!(chunk_bounds(10, 40, 0), vec![0, 10]);
        assert_eq!(chunk_bounds(2, 400, 1), vec![0, 1, 2]);
    }

    #[test]
    fn fingerprint_sees_every_field() {
        let b = Buckets { indices: vec![1, 0], offsets: vec![0, 1, 2], limits: vec![5, 5], classes: vec![0, 0] };
        let f = |nb: &[u64], names: &[&str]| fingerprint(&b, nb, &[0, 0], names).unwrap();
        let base = f(&[4, 4], &["f32@cpu"]);
        assert_eq!(base, f(&[4, 4], &["f32@cpu"]));
        assert_ne!(base, f(&[4, 8], &["f32@cpu"]));
        assert_ne!(base, f(&[4, 4], &["f16@cpu"]));
        let b2 = Buckets { indices: vec![0, 1], ..b.clone() };
        assert_ne!(base, fingerprint(&b2, &[4, 4], &[0, 0], &["f32@cpu"]).unwrap());
    }
}

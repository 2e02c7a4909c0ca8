//! Exact k-nearest-neighbour search over a [`Datastore`] and the kNN-LM distribution made
//! from the neighbours: `p_kNN(v) ∝ Σ_{j: value_j = v} exp(-d_j / τ)`, `d` the squared L2
//! distance (FAISS's `IndexFlatL2`/IVF-PQ distances, which the reference's τ applies to).
//!
//! Two searches: [`search`], exact and blocked (`|q - k|^2 = |q|^2 + |k|^2 - 2 q·k`, the dot
//! products of a block of queries against a block of keys one matmul, a bounded max-heap per
//! query), and [`search_hnsw`], an HNSW graph (the `hnsw_rs` crate) whose neighbours get their
//! exact distances recomputed. Exact search costs `queries × keys × dim`; on 2 cores it does
//! about 4e10 multiply-adds a second (20k keys searched with themselves: 6 s), so 400k keys
//! would take about 40 minutes. HNSW (16 links, ef 100) on the same 20k keys: 15 s to build,
//! 1.7 s per 2,000 queries, recall@65 0.995. Training targets use HNSW (the trainer prints its
//! measured recall), the kNN-LM evaluation (a few tens of thousands of queries) exact search.

use std::collections::BinaryHeap;

use candle_core::{Device, Tensor};

use super::datastore::Datastore;
use crate::train::{Progress, Result};

/// Queries per matmul block, and keys per block.
const QUERY_BLOCK: usize = 512;
const KEY_BLOCK: usize = 8192;

/// The `k` nearest keys of each query, nearest first: `(index, squared distance)`. A query
/// may have fewer than `k` when the datastore is that small.
#[derive(Debug, Clone, PartialEq)]
pub struct Neighbours {
    pub per_query: Vec<Vec<(u32, f32)>>,
}

/// A neighbour candidate ordered by distance (max-heap: the worst kept one on top).
#[derive(Debug, Clone, Copy, PartialEq)]
struct Candidate(f32, u32);

impl Eq for Candidate {}

impl PartialOrd for Candidate {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for Candidate {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        self.0.total_cmp(&other.0).then(self.1.cmp(&other.1))
    }
}

/// The `k` nearest keys of every query row of `queries` (`(m, dim)` row-major). With
/// `self_offset = Some(o)`, query `i` is key `o + i` and never its own neighbour (the
/// reference's `--ignore_first` when the datastore is searched with its own keys).
pub fn search(
    store: &Datastore,
    queries: &[f32],
    k: usize,
    self_offset: Option<usize>,
    progress: &mut dyn Progress,
) -> Result<Neighbours> {
    let dim = store.dim;
    let m = queries.len() / dim.max(1);
    let key_norms: Vec<f32> = store.keys.chunks(dim).map(sq_norm).collect();
    let mut per_query = Vec::with_capacity(m);
    progress.phase("neighbours", m);
    for q0 in (0..m).step_by(QUERY_BLOCK) {
        let qn = QUERY_BLOCK.min(m - q0);
        let q_rows = &queries[q0 * dim..(q0 + qn) * dim];
        let q = Tensor::from_slice(q_rows, (qn, dim), &Device::Cpu)?;
        let q_norms: Vec<f32> = q_rows.chunks(dim).map(sq_norm).collect();
        let mut heaps: Vec<BinaryHeap<Candidate>> =
            (0..qn).map(|_| BinaryHeap::with_capacity(k + 1)).collect();
        for k0 in (0..store.len()).step_by(KEY_BLOCK) {
            let kn = KEY_BLOCK.min(store.len() - k0);
            let keys = Tensor::from_slice(
                &store.keys[k0 * dim..(k0 + kn) * dim],
                (kn, dim),
                &Device::Cpu,
            )?;
            let dots = q.matmul(&keys.t()?)?.flatten_all()?.to_vec1::<f32>()?; // (qn, kn)
            for (i, heap) in heaps.iter_mut().enumerate() {
                let own = self_offset.map(|o| o + q0 + i);
                let row = &dots[i * kn..(i + 1) * kn];
                push_row(heap, k, k0, row, q_norms[i], &key_norms[k0..k0 + kn], own);
            }
        }
        for heap in heaps {
            let mut v: Vec<(u32, f32)> = heap.into_iter().map(|c| (c.1, c.0)).collect();
            v.sort_by(|a, b| a.1.total_cmp(&b.1).then(a.0.cmp(&b.0)));
            per_query.push(v);
        }
        progress.advance(qn);
    }
    Ok(Neighbours { per_query })
}

/// HNSW graph parameters: links per node, and the candidate lists while building and searching.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HnswParams {
    pub links: usize,
    pub ef_construction: usize,
    pub ef_search: usize,
}

impl Default for HnswParams {
    fn default() -> Self {
        Self {
            links: 16,
            ef_construction: 100,
            ef_search: 100,
        }
    }
}

/// Points inserted, and queries searched, per parallel call (progress granularity).
const HNSW_CHUNK: usize = 4096;

/// [`search`] through an HNSW graph over the keys: approximate neighbours, exact distances.
pub fn search_hnsw(
    store: &Datastore,
    queries: &[f32],
    k: usize,
    self_offset: Option<usize>,
    params: HnswParams,
    progress: &mut dyn Progress,
) -> Result<Neighbours> {
    use hnsw_rs::prelude::{DistL2, Hnsw};
    let dim = store.dim;
    let keys: Vec<&[f32]> = store.keys.chunks(dim).collect();
    let max_layers = 16;
    let graph = Hnsw::<f32, DistL2>::new(
        params.links,
        keys.len(),
        max_layers,
        params.ef_construction,
        DistL2 {},
    );
    progress.phase("index", keys.len());
    let points: Vec<(&[f32], usize)> = keys.iter().enumerate().map(|(i, r)| (*r, i)).collect();
    for chunk in points.chunks(HNSW_CHUNK) {
        graph.parallel_insert_slice(&chunk.to_vec());
        progress.advance(chunk.len());
    }
    let m = queries.len() / dim.max(1);
    progress.phase("neighbours", m);
    let extra = usize::from(self_offset.is_some());
    let mut per_query = Vec::with_capacity(m);
    for q0 in (0..m).step_by(HNSW_CHUNK) {
        let qn = HNSW_CHUNK.min(m - q0);
        let batch: Vec<Vec<f32>> = queries[q0 * dim..(q0 + qn) * dim]
            .chunks(dim)
            .map(<[f32]>::to_vec)
            .collect();
        let found = graph.parallel_search(&batch, k + extra, params.ef_search.max(k + extra));
        for (i, hits) in found.into_iter().enumerate() {
            let own = self_offset.map(|o| o + q0 + i);
            let q = &batch[i];
            let mut v: Vec<(u32, f32)> = hits
                .into_iter()
                .filter(|h| Some(h.d_id) != own)
                .map(|h| (h.d_id as u32, sq_distance(q, keys[h.d_id])))
                .collect();
            v.sort_by(|a, b| a.1.total_cmp(&b.1).then(a.0.cmp(&b.0)));
            v.truncate(k);
            per_query.push(v);
        }
        progress.advance(qn);
    }
    Ok(Neighbours { per_query })
}

/// The share of `found` (neighbours of the datastore's own keys, each query excluded) that
/// are among the exact `k` nearest, over `sample` queries spread evenly through the datastore:
/// the recall@k of an approximate search, measured by exact search of those queries. A found
/// key as near as the exact k-th counts (keys at equal distances are interchangeable).
pub fn recall(store: &Datastore, found: &Neighbours, sample: usize) -> Result<f64> {
    let n = found.per_query.len().min(store.len());
    let step = (n / sample.max(1)).max(1);
    let (mut hits, mut total) = (0usize, 0usize);
    for i in (0..n).step_by(step) {
        let k = found.per_query[i].len();
        let query = &store.keys[i * store.dim..(i + 1) * store.dim];
        let exact = search(store, query, k + 1, None, &mut crate::train::Quiet)?;
        let truth: Vec<f32> = exact.per_query[0]
            .iter()
            .filter(|x| x.0 as usize != i)
            .map(|x| x.1)
            .take(k)
            .collect();
        let Some(&kth) = truth.last() else {
            continue;
        };
        hits += hits_within(&found.per_query[i], kth);
        total += k;
    }
    Ok(if total == 0 {
        1.0
    } else {
        hits as f64 / total as f64
    })
}

/// [`recall`] of `found` against an exact search of the same queries (`exact`), every query.
pub fn recall_against(exact: &Neighbours, found: &Neighbours) -> f64 {
    let (mut hits, mut total) = (0usize, 0usize);
    for (e, f) in exact.per_query.iter().zip(&found.per_query) {
        let Some(&(_, kth)) = e.last() else { continue };
        hits += hits_within(f, kth);
        total += e.len();
    }
    hits as f64 / total.max(1) as f64
}

/// Found neighbours at most as far as the exact k-th (ties are interchangeable).
fn hits_within(found: &[(u32, f32)], kth: f32) -> usize {
    let within = kth * (1.0 + 1e-5) + 1e-6;
    found.iter().filter(|x| x.1 <= within).count()
}

fn sq_distance(a: &[f32], b: &[f32]) -> f32 {
    a.iter().zip(b).map(|(x, y)| (x - y) * (x - y)).sum()
}

/// Offers one query's distances to one key block to its heap of the `k` best.
fn push_row(
    heap: &mut BinaryHeap<Candidate>,
    k: usize,
    k0: usize,
    dots: &[f32],
    q_norm: f32,
    key_norms: &[f32],
    own: Option<usize>,
) {
    let mut worst = heap.peek().map_or(f32::INFINITY, |c| c.0);
    for (j, (&dot, &kn)) in dots.iter().zip(key_norms).enumerate() {
        // Rounding can take an exact match slightly below 0.
        let d = (q_norm + kn - 2.0 * dot).max(0.0);
        if heap.len() >= k && d >= worst {
            continue;
        }
        if own == Some(k0 + j) {
            continue;
        }
        heap.push(Candidate(d, (k0 + j) as u32));
        if heap.len() > k {
            heap.pop();
        }
        worst = heap.peek().map_or(f32::INFINITY, |c| c.0);
    }
}

fn sq_norm(v: &[f32]) -> f32 {
    v.iter().map(|x| x * x).sum()
}

/// The kNN-LM distribution of one query from its neighbours (nearest first) and the values
/// they hold: `(token, probability)` pairs, most probable first, summing to 1 (empty when
/// there are no neighbours).
pub fn distribution(neighbours: &[(u32, f32)], values: &[u32], tau: f32) -> Vec<(u32, f32)> {
    let Some(&(_, nearest)) = neighbours.first() else {
        return Vec::new();
    };
    // Shifting by the nearest distance changes nothing after normalisation and keeps exp finite.
    let mut mass: Vec<(u32, f32)> = Vec::with_capacity(neighbours.len());
    for &(index, d) in neighbours {
        let w = (-(d - nearest) / tau).exp();
        let token = values[index as usize];
        match mass.iter_mut().find(|(t, _)| *t == token) {
            Some((_, m)) => *m += w,
            None => mass.push((token, w)),
        }
    }
    let total: f32 = mass.iter().map(|(_, m)| m).sum();
    for (_, m) in mass.iter_mut() {
        *m /= total;
    }
    mass.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
    mass
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::train::Quiet;
    use rand::{Rng, SeedableRng};

    fn store(n: usize, dim: usize, seed: u64) -> Datastore {
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        Datastore {
            keys: (0..n * dim)
                .map(|_| rng.random::<f32>() * 4.0 - 2.0)
                .collect(),
            values: (0..n).map(|i| (i % 7) as u32).collect(),
            dim,
        }
    }

    fn brute_force(s: &Datastore, q: &[f32], k: usize, own: Option<usize>) -> Vec<(u32, f32)> {
        let mut all: Vec<(u32, f32)> = s
            .keys
            .chunks(s.dim)
            .enumerate()
            .filter(|(j, _)| Some(*j) != own)
            .map(|(j, key)| {
                (
                    j as u32,
                    key.iter().zip(q).map(|(a, b)| (a - b) * (a - b)).sum(),
                )
            })
            .collect();
        all.sort_by(|a, b| a.1.total_cmp(&b.1).then(a.0.cmp(&b.0)));
        all.truncate(k);
        all
    }

    #[test]
    fn blocked_search_finds_what_brute_force_finds() {
        // More keys than one block and more queries than one block, so both loops turn.
        let s = store(KEY_BLOCK + 300, 6, 1);
        let queries = store(QUERY_BLOCK + 5, 6, 2).keys;
        let found = search(&s, &queries, 5, None, &mut Quiet).unwrap();
        for (i, got) in found.per_query.iter().enumerate() {
            let want = brute_force(&s, &queries[i * 6..(i + 1) * 6], 5, None);
            let ids = |v: &[(u32, f32)]| v.iter().map(|x| x.0).collect::<Vec<_>>();
            assert_eq!(ids(got), ids(&want), "query {i}");
            for (g, w) in got.iter().zip(&want) {
                assert!((g.1 - w.1).abs() < 1e-3 * w.1.max(1.0));
            }
        }
    }

    #[test]
    fn a_datastore_searched_with_its_own_keys_skips_each_query_itself() {
        let s = store(50, 4, 3);
        let found = search(&s, &s.keys[10 * 4..20 * 4], 3, Some(10), &mut Quiet).unwrap();
        for (i, got) in found.per_query.iter().enumerate() {
            assert!(got.iter().all(|&(j, _)| j as usize != 10 + i));
            let want = brute_force(&s, &s.keys[(10 + i) * 4..(11 + i) * 4], 3, Some(10 + i));
            assert_eq!(
                got.iter().map(|x| x.0).collect::<Vec<_>>(),
                want.iter().map(|x| x.0).collect::<Vec<_>>()
            );
        }
    }

    #[test]
    fn hnsw_finds_nearly_what_exact_search_finds_and_skips_the_query_itself() {
        let s = store(3000, 8, 4);
        let exact = search(&s, &s.keys[..200 * 8], 10, Some(0), &mut Quiet).unwrap();
        let approx = search_hnsw(
            &s,
            &s.keys[..200 * 8],
            10,
            Some(0),
            HnswParams::default(),
            &mut Quiet,
        )
        .unwrap();
        let mut hits = 0;
        for (i, (e, a)) in exact.per_query.iter().zip(&approx.per_query).enumerate() {
            assert_eq!(a.len(), 10);
            assert!(
                a.iter().all(|&(j, _)| j as usize != i),
                "query {i} found itself"
            );
            assert!(a.windows(2).all(|w| w[0].1 <= w[1].1));
            hits += a.iter().filter(|x| e.iter().any(|y| y.0 == x.0)).count();
        }
        assert!(
            hits as f64 / 2000.0 > 0.9,
            "recall {}",
            hits as f64 / 2000.0
        );
    }

    #[test]
    fn the_distribution_sums_weights_per_token() {
        // Neighbours at squared distances 0, 1 and 2 holding tokens 5, 9, 5; τ = 1.
        let values = [5, 9, 5];
        let p = distribution(&[(0, 0.0), (1, 1.0), (2, 2.0)], &values, 1.0);
        let (e1, e2) = ((-1f32).exp(), (-2f32).exp());
        let z = 1.0 + e1 + e2;
        assert_eq!(p[0].0, 5);
        assert!((p[0].1 - (1.0 + e2) / z).abs() < 1e-6);
        assert_eq!(p[1].0, 9);
        assert!((p[1].1 - e1 / z).abs() < 1e-6);
        assert!(distribution(&[], &values, 1.0).is_empty());
    }

    #[test]
    fn recall_against_exact_counts_ties_and_misses() {
        let exact = Neighbours {
            per_query: vec![vec![(0, 1.0), (1, 2.0)], vec![(2, 1.0), (3, 4.0)]],
        };
        assert_eq!(recall_against(&exact, &exact), 1.0);
        // A key at the k-th distance counts (ties), one beyond it does not.
        let found = Neighbours {
            per_query: vec![vec![(0, 1.0), (7, 2.0)], vec![(2, 1.0), (9, 5.0)]],
        };
        assert_eq!(recall_against(&exact, &found), 0.75);
    }
}

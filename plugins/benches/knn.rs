//! Exact against HNSW neighbour search on the first keys of a real datastore (the choice
//! `server train memory` makes between them, docs/BENCHMARKS.md): each of the first `KEYS` keys
//! searched against the others, k = 64, self excluded, as the kNN targets are made. Reports both
//! times, HNSW's recall@k against the exact result, and the median squared distance of the
//! nearest and of the k-th neighbour (what the kNN temperature τ is set against).
//!
//! Run: `cargo bench -p plugins --bench knn -- DATASTORE [KEYS] [K]` with a
//! `datastore.safetensors` from a `server train memory` work folder (KEYS default 20000, K 64).
//! Prints one JSON object.

use std::path::PathBuf;
use std::time::Instant;

use plugins::memory::datastore::Datastore;
use plugins::memory::knn::{recall_against, search, search_hnsw, HnswParams, Neighbours};
use plugins::train::Quiet;

fn main() -> anyhow::Result<()> {
    // `cargo bench` passes `--bench`; the positional arguments are ours.
    let args: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with("--"))
        .collect();
    let path = PathBuf::from(args.first().ok_or_else(|| {
        anyhow::anyhow!("usage: cargo bench -p plugins --bench knn -- DATASTORE [KEYS] [K]")
    })?);
    let keys: usize = args.get(1).map_or(Ok(20_000), |s| s.parse())?;
    let k: usize = args.get(2).map_or(Ok(64), |s| s.parse())?;
    let mut store = Datastore::load(&path)?;
    let keys = keys.min(store.len());
    store.keys.truncate(keys * store.dim);
    store.values.truncate(keys);

    let started = Instant::now();
    let exact = search(&store, &store.keys, k, Some(0), &mut Quiet)?;
    let exact_s = started.elapsed().as_secs_f64();
    let started = Instant::now();
    let approx = search_hnsw(
        &store,
        &store.keys,
        k,
        Some(0),
        HnswParams::default(),
        &mut Quiet,
    )?;
    let hnsw_s = started.elapsed().as_secs_f64();

    let report = serde_json::json!({
        "datastore": path, "keys": keys, "dim": store.dim, "k": k,
        "exact_seconds": exact_s, "hnsw_seconds": hnsw_s, "hnsw": HnswParams::default().links,
        "recall": recall_against(&exact, &approx),
        "median_sq_distance_first": median_at(&exact, 0),
        "median_sq_distance_kth": median_at(&exact, k - 1),
    });
    println!("{report}");
    Ok(())
}

fn median_at(found: &Neighbours, rank: usize) -> f32 {
    let mut d: Vec<f32> = found
        .per_query
        .iter()
        .filter_map(|v| v.get(rank).map(|x| x.1))
        .collect();
    d.sort_by(f32::total_cmp);
    d.get(d.len() / 2).copied().unwrap_or(f32::NAN)
}

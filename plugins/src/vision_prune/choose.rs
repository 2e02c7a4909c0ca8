//! Which tokens of a prompt stay after the pruning layer: every text token, and a fraction of
//! each image's tokens.

use rand::seq::index::sample;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;

/// Offsets of `tokens` equal to `image`, in order.
pub fn image_offsets(tokens: &[u32], image: u32) -> Vec<usize> {
    (0..tokens.len()).filter(|&i| tokens[i] == image).collect()
}

/// The instruction an image's tokens are judged against: every text offset of `0..len` after
/// the first image offset (the question after the image, and the template's tokens around
/// it), or every text offset when the image comes last.
pub fn instruction_offsets(len: usize, images: &[usize]) -> Vec<usize> {
    let first = images.first().copied().unwrap_or(len);
    let after: Vec<usize> = (first..len)
        .filter(|i| images.binary_search(i).is_err())
        .collect();
    match after.is_empty() {
        true => (0..len)
            .filter(|i| images.binary_search(i).is_err())
            .collect(),
        false => after,
    }
}

/// How many of `n` image tokens a kept fraction `keep` keeps: at least one, rounded up.
pub fn kept_count(n: usize, keep: f32) -> usize {
    ((n as f64 * keep as f64).ceil() as usize).clamp(1.min(n), n)
}

/// The offsets of a row of `len` tokens that stay: every offset not in `images`, and
/// `kept_count(images.len(), keep)` of `images` drawn uniformly with `seed`. Ascending.
pub fn keep_random(len: usize, images: &[usize], keep: f32, seed: u64) -> Vec<usize> {
    let k = kept_count(images.len(), keep);
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let mut chosen: Vec<usize> = sample(&mut rng, images.len(), k)
        .into_iter()
        .map(|i| images[i])
        .collect();
    chosen.sort_unstable();
    merge_text(len, images, &chosen)
}

/// The offsets of a row of `len` tokens that stay: every offset not in `images`, and the
/// `kept_count(images.len(), keep)` of `images` with the highest `score` (indexed by offset;
/// ties to the earlier). Ascending.
pub fn keep_top(len: usize, images: &[usize], keep: f32, score: &[f32]) -> Vec<usize> {
    let k = kept_count(images.len(), keep);
    let mut ranked = images.to_vec();
    let at = |i: usize| score.get(i).copied().unwrap_or(f32::NEG_INFINITY);
    ranked.sort_by(|&a, &b| at(b).total_cmp(&at(a)).then(a.cmp(&b)));
    let mut chosen = ranked[..k].to_vec();
    chosen.sort_unstable();
    merge_text(len, images, &chosen)
}

/// Every offset of `0..len` that is not an image token, with the `chosen` image offsets.
fn merge_text(len: usize, images: &[usize], chosen: &[usize]) -> Vec<usize> {
    let mut out = Vec::with_capacity(len - images.len() + chosen.len());
    let (mut img, mut pick) = (images.iter().peekable(), chosen.iter().peekable());
    for i in 0..len {
        if img.peek() == Some(&&i) {
            img.next();
            if pick.peek() == Some(&&i) {
                pick.next();
                out.push(i);
            }
        } else {
            out.push(i);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn text_tokens_all_stay_and_the_image_keeps_its_fraction() {
        let image = 9;
        let mut tokens = vec![1, 2];
        tokens.extend(std::iter::repeat_n(image, 16));
        tokens.extend([3, 4, 5]);
        let images = image_offsets(&tokens, image);
        assert_eq!(images, (2..18).collect::<Vec<_>>());
        for (keep, want) in [(1.0, 16), (0.5, 8), (0.25, 4), (0.1, 2), (0.01, 1)] {
            let kept = keep_random(tokens.len(), &images, keep, 7);
            assert!(kept.windows(2).all(|w| w[0] < w[1]), "ascending");
            let kept_images = kept.iter().filter(|i| images.contains(i)).count();
            assert_eq!(kept_images, want, "keep {keep}");
            for text in [0, 1, 18, 19, 20] {
                assert!(kept.contains(&text), "text offset {text} kept at {keep}");
            }
        }
        let a = keep_random(tokens.len(), &images, 0.25, 7);
        assert_eq!(a, keep_random(tokens.len(), &images, 0.25, 7), "seeded");
        assert_ne!(
            a,
            keep_random(tokens.len(), &images, 0.25, 8),
            "seed matters"
        );
    }

    #[test]
    fn the_top_scored_image_tokens_stay() {
        let images = [1, 2, 3, 4];
        let score = [9.0, 0.1, 0.7, 0.3, 0.7, 9.0];
        assert_eq!(keep_top(6, &images, 0.5, &score), vec![0, 2, 4, 5]);
        assert_eq!(
            keep_top(6, &images, 0.25, &score),
            vec![0, 2, 5],
            "ties to the earlier"
        );
        assert_eq!(keep_top(6, &images, 1.0, &score), vec![0, 1, 2, 3, 4, 5]);
    }

    #[test]
    fn a_row_without_image_tokens_keeps_everything() {
        assert_eq!(kept_count(0, 0.25), 0);
        assert_eq!(keep_random(5, &[], 0.25, 1), vec![0, 1, 2, 3, 4]);
    }
}

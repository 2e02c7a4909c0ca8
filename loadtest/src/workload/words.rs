//! Synthetic prompt text: seeded draws from a list of short, common English words.
//!
//! The load tester has no tokenizer (it must measure any server), so a prompt of N "tokens" is
//! N words that are a single token, with their leading space, in the BPE vocabularies of the
//! usual model families. The server's `usage.prompt_tokens` is what gets recorded, so the
//! approximation only shifts the target length, never the measurement. Random words also keep
//! prefix caches from turning a prefill benchmark into a cache benchmark.

use rand::Rng;

#[rustfmt::skip]
const WORDS: &[&str] = &[
    "the", "of", "and", "to", "in", "is", "was", "that", "for", "on", "as", "with", "by", "he",
    "at", "from", "his", "it", "an", "were", "are", "which", "this", "be", "or", "has", "had",
    "first", "one", "their", "its", "new", "after", "but", "who", "not", "they", "have", "her",
    "she", "two", "been", "other", "when", "there", "all", "during", "into", "school", "time",
    "may", "years", "more", "most", "only", "over", "city", "some", "world", "would", "where",
    "later", "up", "such", "used", "many", "can", "state", "about", "national", "out", "known",
    "university", "united", "then", "made", "also", "three", "while", "people", "game", "season",
    "both", "team", "each", "year", "than", "him", "music", "part", "film", "between", "under",
    "being", "these", "house", "place", "well", "early", "through", "four", "war", "water",
    "second", "since", "government", "church", "called", "local", "number", "life", "way", "high",
    "area", "end", "before", "same", "work", "home", "great", "day", "name", "back", "long",
    "group", "line", "found", "took", "like", "played", "side", "record", "family", "album",
    "began", "large", "small", "member", "based", "five", "public", "general", "village", "south",
    "north", "west", "east", "company", "river", "book", "road", "light", "point", "power", "open",
    "field", "king", "form", "head", "body", "system", "left", "right", "old", "young", "love",
    "song", "show", "story", "land", "sea", "sky", "tree", "stone", "fire", "wind", "rain", "snow",
    "sun", "moon", "star", "night", "morning", "bird", "fish", "horse", "dog", "cat", "red",
    "blue", "green", "black", "white", "gold", "iron", "glass", "paper", "bread", "milk", "salt",
    "door", "room", "wall", "table", "chair", "bed", "hand", "eye", "face", "heart", "mind",
    "voice", "word", "letter", "law", "court", "market", "price", "money", "trade", "ship",
    "train", "car", "bridge", "tower", "garden", "forest", "hill", "lake", "island", "coast",
    "valley", "plain", "desert", "winter", "summer", "spring", "autumn", "child", "father",
    "mother", "friend", "doctor", "teacher", "farmer", "soldier",
];

/// `n` seeded words separated by spaces.
pub fn text(rng: &mut impl Rng, n: usize) -> String {
    let mut out = String::with_capacity(n * 6);
    for i in 0..n {
        if i > 0 {
            out.push(' ');
        }
        out.push_str(WORDS[rng.random_range(0..WORDS.len())]);
    }
    out
}

#[cfg(test)]
mod tests {
    use rand::SeedableRng;
    use rand_chacha::ChaCha8Rng;

    use super::*;

    #[test]
    fn text_has_n_words_and_depends_on_the_seed_only() {
        let a = text(&mut ChaCha8Rng::seed_from_u64(1), 50);
        let b = text(&mut ChaCha8Rng::seed_from_u64(1), 50);
        let c = text(&mut ChaCha8Rng::seed_from_u64(2), 50);
        assert_eq!(a.split(' ').count(), 50);
        assert_eq!(a, b);
        assert_ne!(a, c);
    }
}

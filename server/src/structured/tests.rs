#![allow(clippy::unwrap_used)]

use std::sync::Arc;

use rand::{Rng, SeedableRng};
use serde_json::{json, Value};

use super::*;
use crate::engine::testing::{tiny_tokenizer, TINY_EOS, TINY_VOCAB};

fn grammars() -> Grammars {
    Grammars::new(Arc::new(tiny_tokenizer().unwrap()), TINY_VOCAB).unwrap()
}

fn schema(schema: Value) -> ResponseFormat {
    serde_json::from_value(json!({
        "type": "json_schema",
        "json_schema": {"name": "t", "strict": true, "schema": schema}
    }))
    .unwrap()
}

/// Samples the most likely allowed token of random logits (seeded) until the end token or
/// `limit` tokens; the text, and whether it ended by itself.
fn generate(constraint: &mut Constraint, seed: u64, limit: usize) -> (String, bool) {
    let tokenizer = tiny_tokenizer().unwrap();
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut ids = Vec::new();
    for _ in 0..limit {
        let mut logits: Vec<f32> = (0..TINY_VOCAB).map(|_| rng.random::<f32>() * 4.0).collect();
        constraint.mask(&mut logits, &[TINY_EOS]).unwrap();
        let (id, best) = logits
            .iter()
            .enumerate()
            .max_by(|a, b| a.1.total_cmp(b.1))
            .unwrap();
        assert!(best.is_finite(), "every token masked after {ids:?}");
        let id = id as u32;
        if id == TINY_EOS {
            return (tokenizer.decode(&ids, true).unwrap(), true);
        }
        constraint.consume(id, &[TINY_EOS]).unwrap();
        ids.push(id);
    }
    (tokenizer.decode(&ids, true).unwrap(), false)
}

#[test]
fn random_logits_under_a_schema_always_give_a_valid_object() {
    let person = schema(json!({
        "type": "object",
        "properties": {
            "name": {"type": "string", "maxLength": 5},
            "age": {"type": "integer", "minimum": 0, "maximum": 99},
            "role": {"enum": ["admin", "user"]}
        },
        "required": ["name", "age"],
        "additionalProperties": false
    }));
    let g = grammars();
    for seed in 0..20 {
        let (text, ended) = generate(&mut g.compile(&person).unwrap().unwrap(), seed, 200);
        assert!(ended, "seed {seed}: {text}");
        let v: Value = serde_json::from_str(&text).unwrap_or_else(|e| panic!("{text}: {e}"));
        let name = v["name"].as_str().unwrap();
        assert!(name.chars().count() <= 5, "{text}");
        assert!((0..=99).contains(&v["age"].as_i64().unwrap()), "{text}");
        assert!(
            v.get("role").is_none_or(|r| r == "admin" || r == "user"),
            "{text}"
        );
        assert!(v.as_object().unwrap().len() <= 3, "{text}");
        assert!(
            !text.contains('\n') && text.contains("\": "),
            "compact layout: {text}"
        );
    }
}

#[test]
fn arrays_keep_their_bounds_and_enums() {
    let colours = schema(json!({
        "type": "array", "items": {"enum": ["red", "green"]}, "minItems": 1, "maxItems": 3
    }));
    let g = grammars();
    for seed in 0..20 {
        let (text, ended) = generate(&mut g.compile(&colours).unwrap().unwrap(), seed, 100);
        assert!(ended, "{text}");
        let v: Vec<String> = serde_json::from_str(&text).unwrap();
        assert!((1..=3).contains(&v.len()), "{text}");
        assert!(v.iter().all(|c| c == "red" || c == "green"), "{text}");
    }
}

#[test]
fn json_object_gives_an_object_and_text_no_constraint() {
    let g = grammars();
    let object: ResponseFormat = serde_json::from_value(json!({"type": "json_object"})).unwrap();
    let mut ended_once = false;
    for seed in 0..10 {
        let (text, ended) = generate(&mut g.compile(&object).unwrap().unwrap(), seed, 300);
        if ended {
            ended_once = true;
            // Syntax only: random logits write numbers like 38E405553118031953990, valid JSON
            // beyond what an f64 holds.
            serde_json::from_str::<serde::de::IgnoredAny>(&text)
                .unwrap_or_else(|e| panic!("{text}: {e}"));
            assert!(text.starts_with('{') && text.ends_with('}'), "{text}");
        } else {
            assert!(text.starts_with('{'), "{text}");
        }
    }
    assert!(
        ended_once,
        "some object should close within 300 random tokens"
    );
    let text: ResponseFormat = serde_json::from_value(json!({"type": "text"})).unwrap();
    assert!(g.compile(&text).unwrap().is_none());
}

#[test]
fn what_cannot_be_enforced_is_refused_by_name() {
    let g = grammars();
    let unique =
        schema(json!({"type": "array", "items": {"type": "integer"}, "uniqueItems": true}));
    let e = g.compile(&unique).unwrap_err().to_string();
    assert!(e.contains("uniqueItems"), "{e}");
    let remote = schema(json!({"$ref": "https://example.com/schema.json"}));
    let e = g.compile(&remote).unwrap_err().to_string();
    assert!(e.contains("https://example.com/schema.json"), "{e}");
    let unsatisfiable = schema(json!({"type": "integer", "minimum": 5, "maximum": 1}));
    assert!(g.compile(&unsatisfiable).is_err());
}

#[test]
fn choices_copy_the_constraint_and_go_their_own_ways() {
    let g = grammars();
    let f = schema(json!({"enum": ["alpha", "beta"]}));
    let mut first = g.compile(&f).unwrap().unwrap();
    let tokenizer = tiny_tokenizer().unwrap();
    let quote = tokenizer.encode("\"", false).unwrap()[0];
    first.consume(quote, &[TINY_EOS]).unwrap();
    let mut second = first.clone();
    first
        .consume(tokenizer.encode("a", false).unwrap()[0], &[TINY_EOS])
        .unwrap();
    // The copy is still right after the quote: `b` is allowed there, not after `"a`.
    let b = tokenizer.encode("b", false).unwrap()[0];
    let mut logits = vec![0.0; TINY_VOCAB];
    second.mask(&mut logits, &[TINY_EOS]).unwrap();
    assert!(logits[b as usize].is_finite());
    let mut logits = vec![0.0; TINY_VOCAB];
    first.mask(&mut logits, &[TINY_EOS]).unwrap();
    assert!(logits[b as usize].is_infinite());
}

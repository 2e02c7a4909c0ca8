//! The workload: request `i` of a run as a ready-to-send JSON body and its chain name.
//!
//! A request is a pure function of the seed and its index (and, in a multi-turn conversation,
//! of the replies the server gave to the conversation's earlier turns), so every level of a
//! sweep sends the same requests in the same order, and two runs with the same flags send the
//! same bytes. The body is `model`, the prompt (`messages` or `prompt`, after the shared system
//! prompt if one is asked for), `max_tokens`, `stream` (with `stream_options.include_usage`,
//! so token counts come from the server), `ignore_eos` when asked, then `--extra-body` and the
//! chain's fragment merged over it in that order.
//!
//! With `--turns T`, requests `c·T .. c·T + T` of a phase are the turns of one conversation:
//! turn `t` resends the system prompt, the user messages of turns `0..t` (each the one its own
//! index draws) with the server's replies to them, then its own user message.

mod mix;
mod prompts;
mod words;

use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use rand_distr::{Distribution, Normal};
use serde_json::{json, Value};

pub use mix::{Mix, BASE};
pub use prompts::{PromptLine, PromptsError};

use crate::config::{Endpoint, LengthDist, Target, WorkloadSpec};

/// One request, prepared before its clock starts.
#[derive(Debug, Clone)]
pub struct PreparedRequest {
    pub index: u64,
    /// Its turn in its conversation, from 1 (always 1 without `--turns`).
    pub turn: u32,
    pub chain: String,
    pub body: Vec<u8>,
    pub max_tokens: u32,
}

/// What each seeded generator is for; distinct purposes draw unrelated streams from one seed.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Purpose {
    Prompt = 1,
    Mix = 2,
    Arrivals = 3,
    System = 4,
}

/// A generator for `purpose`, independent of the others drawn from the same seed, and of other
/// `stream`s of the same purpose.
pub(crate) fn seeded(seed: u64, purpose: Purpose, stream: u64) -> ChaCha8Rng {
    let key = seed ^ (purpose as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15);
    let mut rng = ChaCha8Rng::seed_from_u64(key);
    rng.set_stream(stream);
    rng
}

#[derive(Debug, Clone)]
pub struct Workload {
    spec: WorkloadSpec,
    endpoint: Endpoint,
    stream: bool,
    model: String,
    prompts: Option<Vec<PromptLine>>,
    /// The system prompt every synthetic request starts with.
    system: Option<String>,
    mix: Mix,
}

impl Workload {
    /// Reads the prompts file, if any, and fixes the model every body names.
    pub fn new(spec: &WorkloadSpec, target: &Target, model: String) -> Result<Self, PromptsError> {
        let prompts = match &spec.prompts {
            Some(path) => Some(prompts::load(path, target.endpoint)?),
            None => None,
        };
        let system = (spec.system_tokens > 0).then(|| {
            let mut rng = seeded(spec.seed, Purpose::System, 0);
            words::text(&mut rng, spec.system_tokens as usize)
        });
        Ok(Workload {
            spec: spec.clone(),
            endpoint: target.endpoint,
            stream: target.stream,
            model,
            prompts,
            system,
            mix: Mix::new(&spec.mix, spec.seed),
        })
    }

    /// Turns per conversation (1: every request stands alone).
    pub fn turns(&self) -> u32 {
        self.spec.turns.max(1)
    }

    /// The chain names of the mix, `base` alone without one.
    pub fn chains(&self) -> &[String] {
        self.mix.names()
    }

    /// Request `index` of the run, the first turn of its conversation.
    pub fn request(&self, index: u64) -> PreparedRequest {
        self.turn(index, &[])
    }

    /// Request `index` of the run as the turn after `replies`, the server's replies to the
    /// conversation's earlier turns (requests `index - replies.len() .. index`).
    pub fn turn(&self, index: u64, replies: &[String]) -> PreparedRequest {
        let mut rng = seeded(self.spec.seed, Purpose::Prompt, index);
        let mut body = json!({ "model": self.model });
        let line_max = match &self.prompts {
            Some(lines) => {
                let line = &lines[(index % lines.len() as u64) as usize];
                merge(&mut body, &line.fields);
                line.max_tokens
            }
            None => {
                let text = self.user_text(&mut rng);
                merge(&mut body, &self.synthetic(index, replies, text));
                None
            }
        };
        let max_tokens = line_max.unwrap_or_else(|| sample(&mut rng, self.spec.output));
        body["max_tokens"] = json!(max_tokens);
        body["stream"] = json!(self.stream);
        if self.stream {
            body["stream_options"] = json!({ "include_usage": true });
        }
        if self.spec.ignore_eos {
            body["ignore_eos"] = json!(true);
        }
        if let Some(extra) = &self.spec.extra_body {
            merge(&mut body, extra);
        }
        let chain = self.mix.chain(index).to_string();
        if let Some(fragment) = self.spec.chains.get(&chain) {
            merge(&mut body, fragment);
        }
        PreparedRequest {
            index,
            turn: replies.len() as u32 + 1,
            chain,
            body: body.to_string().into_bytes(),
            max_tokens,
        }
    }

    /// A synthetic request's user message: the first draws of its index's generator.
    fn user_text(&self, rng: &mut ChaCha8Rng) -> String {
        let n = sample(rng, self.spec.input) as usize;
        words::text(rng, n)
    }

    /// The prompt fields of a synthetic request: the system prompt, the conversation so far,
    /// then `text`.
    fn synthetic(&self, index: u64, replies: &[String], text: String) -> Value {
        if self.endpoint == Endpoint::Completions {
            let prompt = match &self.system {
                Some(system) => format!("{system}\n\n{text}"),
                None => text,
            };
            return json!({ "prompt": prompt });
        }
        let message = |role: &str, content: &str| json!({"role": role, "content": content});
        let mut messages: Vec<Value> = self.system.iter().map(|s| message("system", s)).collect();
        let first = index.saturating_sub(replies.len() as u64);
        for (k, reply) in replies.iter().enumerate() {
            let mut rng = seeded(self.spec.seed, Purpose::Prompt, first + k as u64);
            messages.push(message("user", &self.user_text(&mut rng)));
            messages.push(message("assistant", reply));
        }
        messages.push(message("user", &text));
        json!({ "messages": messages })
    }
}

/// A length from `dist`, rounded, at least 1.
fn sample(rng: &mut ChaCha8Rng, dist: LengthDist) -> u32 {
    if dist.std <= 0.0 {
        return dist.mean.max(1);
    }
    match Normal::new(f64::from(dist.mean), dist.std) {
        Ok(normal) => normal.sample(rng).round().clamp(1.0, f64::from(u32::MAX)) as u32,
        Err(_) => dist.mean.max(1),
    }
}

/// Merges `fragment` into `into`: objects key by key, recursively; anything else replaces.
pub fn merge(into: &mut Value, fragment: &Value) {
    match (into, fragment) {
        (Value::Object(a), Value::Object(b)) => {
            for (k, v) in b {
                match a.get_mut(k) {
                    Some(slot) if slot.is_object() && v.is_object() => merge(slot, v),
                    _ => {
                        a.insert(k.clone(), v.clone());
                    }
                }
            }
        }
        (into, fragment) => *into = fragment.clone(),
    }
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;
    use crate::cli::Args;

    fn workload(args: &[&str]) -> Workload {
        let mut argv = vec!["loadtest"];
        argv.extend_from_slice(args);
        let c = Args::try_parse_from(argv).unwrap().into_config().unwrap();
        Workload::new(&c.workload, &c.target, "m".into()).unwrap()
    }

    fn body(r: &PreparedRequest) -> Value {
        serde_json::from_slice(&r.body).unwrap()
    }

    #[test]
    fn synthetic_chat_body_has_every_field() {
        let w = workload(&[
            "--input-tokens",
            "12",
            "--output-tokens",
            "5",
            "--ignore-eos",
        ]);
        let b = body(&w.request(0));
        assert_eq!(b["model"], "m");
        let content = b["messages"][0]["content"].as_str().unwrap();
        assert_eq!(content.split(' ').count(), 12);
        assert_eq!(b["max_tokens"], 5);
        assert_eq!(b["stream"], true);
        assert_eq!(b["stream_options"]["include_usage"], true);
        assert_eq!(b["ignore_eos"], true);
        assert_ne!(
            w.request(0).body,
            w.request(1).body,
            "requests differ by index"
        );
        assert_eq!(w.request(3).body, w.request(3).body, "and only by index");
    }

    #[test]
    fn completions_without_stream_send_a_prompt_and_no_stream_options() {
        let w = workload(&["--endpoint", "completions", "--no-stream"]);
        let b = body(&w.request(0));
        assert!(b["prompt"].is_string());
        assert_eq!(b["stream"], false);
        assert!(b.get("stream_options").is_none());
        assert!(
            b.get("ignore_eos").is_none(),
            "servers that deny unknown fields"
        );
    }

    #[test]
    fn chain_fragments_merge_over_extra_body() {
        let w = workload(&[
            "--mix",
            "base=1,s=1",
            "--chain",
            r#"s={"model":"m::sql","stream_options":{"x":1}}"#,
            "--extra-body",
            r#"{"temperature":0,"model":"n"}"#,
        ]);
        let reqs: Vec<_> = (0..2).map(|i| w.request(i)).collect();
        let s = reqs.iter().find(|r| r.chain == "s").unwrap();
        let base = reqs.iter().find(|r| r.chain == "base").unwrap();
        assert_eq!(body(s)["model"], "m::sql");
        assert_eq!(
            body(s)["stream_options"],
            json!({"include_usage": true, "x": 1})
        );
        assert_eq!(body(base)["model"], "n");
        assert_eq!(body(base)["temperature"], 0);
    }

    #[test]
    fn a_later_turn_resends_the_system_prompt_the_earlier_turns_and_the_replies() {
        let w = workload(&[
            "--system-tokens",
            "30",
            "--input-tokens",
            "8",
            "--turns",
            "3",
        ]);
        let first = body(&w.turn(6, &[]));
        let replies = ["one reply".to_string(), "another".to_string()];
        let third = w.turn(8, &replies);
        assert_eq!(third.turn, 3);
        let messages = body(&third)["messages"].as_array().unwrap().clone();
        let roles: Vec<&str> = messages
            .iter()
            .map(|m| m["role"].as_str().unwrap())
            .collect();
        assert_eq!(
            roles,
            ["system", "user", "assistant", "user", "assistant", "user"]
        );
        assert_eq!(
            messages[0], first["messages"][0],
            "one system prompt for all"
        );
        assert_eq!(
            messages[0]["content"].as_str().unwrap().split(' ').count(),
            30
        );
        assert_eq!(
            messages[1], first["messages"][1],
            "turn 1's own user message"
        );
        assert_eq!(messages[2]["content"], "one reply");
        assert_eq!(messages[3], body(&w.request(7))["messages"][1]);
        assert_eq!(messages[4]["content"], "another");
        assert_eq!(messages[5], body(&w.request(8))["messages"][1]);
        assert_eq!(w.request(8).turn, 1);
    }

    #[test]
    fn lengths_follow_the_distribution() {
        let w = workload(&["--output-tokens", "100", "--output-std", "10"]);
        let lens: Vec<f64> = (0..2000)
            .map(|i| f64::from(w.request(i).max_tokens))
            .collect();
        let mean = lens.iter().sum::<f64>() / lens.len() as f64;
        let var = lens.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / lens.len() as f64;
        assert!((mean - 100.0).abs() < 1.0, "{mean}");
        assert!((var.sqrt() - 10.0).abs() < 1.0, "{}", var.sqrt());
    }
}

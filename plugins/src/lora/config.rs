//! `adapter_config.json`: the PEFT LoRA configuration, read strictly.
//!
//! Fields that change what the adapter computes are honoured (`r`, `lora_alpha`,
//! `use_rslora`, `target_modules`, `rank_pattern`, `alpha_pattern`, `layers_to_transform`)
//! or refused when graft cannot apply them (DoRA, trained biases, `modules_to_save`, ...):
//! serving an adapter with part of it silently dropped gives wrong outputs that look right.
//! Fields that only matter to training (`lora_dropout`, `init_lora_weights`, ...) are ignored.
//! Pattern semantics follow PEFT's `get_pattern_key`: a key matches a module path when the
//! regex `(.*\.)?(KEY)$` matches it; the first matching key wins.

use std::path::Path;

use regex::Regex;
use serde_json::{Map, Value};

use crate::error::{PluginError, Result};

/// The module names LoRA can target here, as in HF Llama.
pub const SUPPORTED_MODULES: [&str; 7] = [
    "q_proj",
    "k_proj",
    "v_proj",
    "o_proj",
    "gate_proj",
    "up_proj",
    "down_proj",
];

/// Which modules the config says the adapter targets.
#[derive(Debug, Clone)]
pub enum Targets {
    /// Suffixes: a module matches when its path is the entry or ends with `.entry`.
    Names(Vec<String>),
    /// A regex the whole module path must match.
    Pattern(Regex),
    /// PEFT's `"all-linear"`: every linear layer but the output head.
    AllLinear,
}

#[derive(Debug, Clone)]
pub struct LoraConfig {
    pub r: usize,
    pub alpha: f64,
    pub use_rslora: bool,
    pub targets: Targets,
    rank_pattern: Vec<(Regex, usize)>,
    alpha_pattern: Vec<(Regex, f64)>,
    /// `layers_to_transform`: the only layers the adapter may touch.
    pub layers: Option<Vec<usize>>,
}

impl LoraConfig {
    pub fn parse(path: &Path, bytes: &[u8]) -> Result<Self> {
        let bad = |m: String| PluginError::bad_file(path, m);
        let value: Value = serde_json::from_slice(bytes).map_err(|e| bad(e.to_string()))?;
        let map = value
            .as_object()
            .ok_or_else(|| bad("the config is not a JSON object".into()))?;
        refuse_unsupported(map).map_err(bad)?;
        let r = map
            .get("r")
            .and_then(rank_value)
            .ok_or_else(|| bad("`r` must be a positive integer".into()))?;
        let alpha = match map.get("lora_alpha") {
            None => 8.0, // PEFT's default
            Some(v) => {
                alpha_value(v).ok_or_else(|| bad(format!("`lora_alpha` {ALPHA_RULE}, got {v}")))?
            }
        };
        Ok(Self {
            r,
            alpha,
            use_rslora: flag(map, "use_rslora").map_err(bad)?,
            targets: targets(map).map_err(bad)?,
            rank_pattern: pattern(map, "rank_pattern", rank_value).map_err(bad)?,
            alpha_pattern: pattern(map, "alpha_pattern", alpha_value).map_err(bad)?,
            layers: layers(map).map_err(bad)?,
        })
    }

    /// Whether the config targets the module at `module_path` (`model.layers.3.mlp.up_proj`).
    pub fn targets(&self, module_path: &str) -> bool {
        match &self.targets {
            Targets::Names(names) => names
                .iter()
                .any(|n| module_path == n || module_path.ends_with(&format!(".{n}"))),
            Targets::Pattern(re) => re.is_match(module_path),
            Targets::AllLinear => true,
        }
    }

    /// The rank and alpha of one module, after `rank_pattern` / `alpha_pattern`.
    pub fn rank_and_alpha(&self, module_path: &str) -> (usize, f64) {
        fn first<T: Copy>(p: &[(Regex, T)], path: &str) -> Option<T> {
            p.iter().find(|(re, _)| re.is_match(path)).map(|x| x.1)
        }
        (
            first(&self.rank_pattern, module_path).unwrap_or(self.r),
            first(&self.alpha_pattern, module_path).unwrap_or(self.alpha),
        )
    }

    /// The factor on `B A x`: `alpha / r`, or `alpha / sqrt(r)` with rsLoRA.
    pub fn scaling(&self, r: usize, alpha: f64) -> f64 {
        match self.use_rslora {
            true => alpha / (r as f64).sqrt(),
            false => alpha / r as f64,
        }
    }
}

/// Options that change the adapter's output in ways graft does not implement.
fn refuse_unsupported(map: &Map<String, Value>) -> std::result::Result<(), String> {
    if let Some(t) = map.get("peft_type").and_then(Value::as_str) {
        if t != "LORA" {
            return Err(format!(
                "peft_type is {t}; only LORA adapters are supported"
            ));
        }
    }
    let set = |k: &str| match map.get(k) {
        None | Some(Value::Null) | Some(Value::Bool(false)) => false,
        Some(Value::Array(a)) => !a.is_empty(),
        Some(Value::Object(o)) => !o.is_empty(),
        Some(Value::String(s)) => !s.is_empty() && s != "none",
        Some(_) => true,
    };
    let refused = [
        ("use_dora", "DoRA is not implemented"),
        ("bias", "trained biases (bias != \"none\") are not applied"),
        ("lora_bias", "a bias on lora_B is not applied"),
        (
            "modules_to_save",
            "modules_to_save (fully trained modules) is not supported",
        ),
        (
            "fan_in_fan_out",
            "fan_in_fan_out weights (Conv1D models) are not supported",
        ),
        ("layer_replication", "layer_replication is not supported"),
        (
            "trainable_token_indices",
            "trainable token embeddings are not supported",
        ),
        (
            "target_parameters",
            "target_parameters (LoRA on raw parameters) is not supported",
        ),
        ("use_qalora", "QA-LoRA is not supported"),
        (
            "alora_invocation_tokens",
            "activated LoRA (aLoRA) is not supported",
        ),
        // Variants newer PEFT versions write as `null` when unused; set, they change the
        // forward pass in ways graft does not implement.
        ("arrow_config", "Arrow adapter routing is not supported"),
        ("use_bdlora", "block-diagonal LoRA is not supported"),
        ("velora_config", "VeLoRA is not supported"),
        ("kasa_config", "KaSA is not supported"),
        ("monteclora_config", "MonteCLoRA is not supported"),
    ];
    match refused.iter().find(|(k, _)| set(k)) {
        Some((k, why)) => Err(format!("`{k}` is set: {why}")),
        None => Ok(()),
    }
}

fn flag(map: &Map<String, Value>, key: &str) -> std::result::Result<bool, String> {
    match map.get(key) {
        None | Some(Value::Null) => Ok(false),
        Some(Value::Bool(b)) => Ok(*b),
        Some(v) => Err(format!("`{key}` must be true or false, got {v}")),
    }
}

fn targets(map: &Map<String, Value>) -> std::result::Result<Targets, String> {
    match map.get("target_modules") {
        Some(Value::String(s)) if s == "all-linear" => Ok(Targets::AllLinear),
        Some(Value::String(s)) => Regex::new(&format!("^(?:{s})$"))
            .map(Targets::Pattern)
            .map_err(|e| format!("`target_modules` is not a valid regex: {e}")),
        Some(Value::Array(items)) => {
            let names = items
                .iter()
                .map(|v| v.as_str().map(str::to_string))
                .collect::<Option<Vec<_>>>()
                .ok_or("`target_modules` must be a list of strings")?;
            let unsupported = names.iter().find(|n| {
                !SUPPORTED_MODULES
                    .iter()
                    .any(|m| *n == m || n.ends_with(&format!(".{m}")))
            });
            match unsupported {
                Some(n) => Err(format!(
                    "target module `{n}` is not supported (LoRA applies to {})",
                    SUPPORTED_MODULES.join(", ")
                )),
                None => Ok(Targets::Names(names)),
            }
        }
        _ => Err("`target_modules` must be a list of module names or a regex string".into()),
    }
}

/// The largest `lora_alpha` accepted. PEFT configs use alphas up to a few hundred; the
/// scaling `alpha / r` multiplies every delta, so 1e308 would make every output infinite.
const MAX_ALPHA: f64 = 65536.0;
const ALPHA_RULE: &str = "must be a finite number of magnitude at most 65536";

fn alpha_value(v: &Value) -> Option<f64> {
    v.as_f64().filter(|a| a.is_finite() && a.abs() <= MAX_ALPHA)
}

/// A rank: a positive integer, as `r` must be.
fn rank_value(v: &Value) -> Option<usize> {
    v.as_u64().filter(|&r| r > 0).map(|r| r as usize)
}

fn pattern<T>(
    map: &Map<String, Value>,
    key: &str,
    value: fn(&Value) -> Option<T>,
) -> std::result::Result<Vec<(Regex, T)>, String> {
    let Some(obj) = map.get(key).and_then(Value::as_object) else {
        return Ok(Vec::new());
    };
    obj.iter()
        .map(|(k, v)| {
            let re = Regex::new(&format!("(?:^|.*\\.)(?:{k})$"))
                .map_err(|e| format!("`{key}` key `{k}` is not a valid regex: {e}"))?;
            let x = value(v).ok_or_else(|| format!("`{key}` value for `{k}` is invalid: {v}"))?;
            Ok((re, x))
        })
        .collect()
}

fn layers(map: &Map<String, Value>) -> std::result::Result<Option<Vec<usize>>, String> {
    let err = || "`layers_to_transform` must be an integer or a list of integers".to_string();
    match map.get("layers_to_transform") {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Number(n)) => Ok(Some(vec![n.as_u64().ok_or_else(err)? as usize])),
        Some(Value::Array(a)) => a
            .iter()
            .map(|v| v.as_u64().map(|x| x as usize))
            .collect::<Option<Vec<_>>>()
            .map(Some)
            .ok_or_else(err),
        Some(_) => Err(err()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn parse(v: Value) -> Result<LoraConfig> {
        LoraConfig::parse(Path::new("adapter_config.json"), v.to_string().as_bytes())
    }

    fn base() -> Value {
        json!({"peft_type": "LORA", "r": 8, "lora_alpha": 16, "target_modules": ["q_proj", "v_proj"],
               "lora_dropout": 0.05, "bias": "none", "modules_to_save": null, "use_dora": false})
    }

    #[test]
    fn a_plain_peft_config_reads_with_alpha_over_r() {
        let c = parse(base()).unwrap();
        assert!(c.targets("model.layers.3.self_attn.q_proj"));
        assert!(!c.targets("model.layers.3.self_attn.k_proj"));
        assert_eq!(
            c.rank_and_alpha("model.layers.3.self_attn.q_proj"),
            (8, 16.0)
        );
        assert_eq!(c.scaling(8, 16.0), 2.0);
    }

    #[test]
    fn rslora_scales_by_the_square_root_of_the_rank() {
        let mut v = base();
        v["use_rslora"] = json!(true);
        assert_eq!(parse(v).unwrap().scaling(16, 8.0), 2.0);
    }

    #[test]
    fn patterns_override_rank_and_alpha_by_module_suffix_first_match_wins() {
        let mut v = base();
        v["rank_pattern"] = json!({"layers.1.self_attn.q_proj": 2, "q_proj": 4});
        v["alpha_pattern"] = json!({"v_proj": 3});
        let c = parse(v).unwrap();
        assert_eq!(
            c.rank_and_alpha("model.layers.1.self_attn.q_proj"),
            (2, 16.0)
        );
        assert_eq!(
            c.rank_and_alpha("model.layers.11.self_attn.q_proj"),
            (4, 16.0)
        );
        assert_eq!(
            c.rank_and_alpha("model.layers.0.self_attn.v_proj"),
            (8, 3.0)
        );
    }

    #[test]
    fn regex_and_all_linear_targets() {
        let mut v = base();
        v["target_modules"] = json!(".*\\.(q|k)_proj");
        let c = parse(v).unwrap();
        assert!(c.targets("model.layers.0.self_attn.k_proj"));
        assert!(!c.targets("model.layers.0.mlp.up_proj"));
        let mut v = base();
        v["target_modules"] = json!("all-linear");
        assert!(parse(v).unwrap().targets("model.layers.0.mlp.up_proj"));
    }

    #[test]
    fn options_graft_cannot_apply_are_refused_by_name() {
        for (key, value, needle) in [
            ("use_dora", json!(true), "DoRA"),
            ("modules_to_save", json!(["lm_head"]), "modules_to_save"),
            ("bias", json!("lora_only"), "bias"),
            ("peft_type", json!("IA3"), "IA3"),
            (
                "target_modules",
                json!(["q_proj", "embed_tokens"]),
                "embed_tokens",
            ),
            ("r", json!(0), "`r`"),
        ] {
            let mut v = base();
            v[key] = value;
            let err = parse(v).unwrap_err().to_string();
            assert!(err.contains(needle), "{key}: {err}");
        }
        assert!(parse(json!([1, 2])).is_err());
    }

    #[test]
    fn regression_non_finite_absurd_and_zero_scalars_are_refused() {
        let cases = [
            ("lora_alpha", json!(1e308), "`lora_alpha`"),
            ("lora_alpha", json!(-1e6), "`lora_alpha`"),
            ("rank_pattern", json!({"q_proj": 0}), "rank_pattern"),
            ("alpha_pattern", json!({"q_proj": 1e300}), "alpha_pattern"),
        ];
        for (key, value, needle) in cases {
            let mut v = base();
            v[key] = value;
            let err = parse(v).unwrap_err().to_string();
            assert!(err.contains(needle), "{key}: {err}");
        }
        let mut v = base();
        v["lora_alpha"] = json!(-16);
        v["rank_pattern"] = json!({"q_proj": 2});
        assert!(
            parse(v).is_ok(),
            "a negative alpha and non-zero ranks are valid"
        );
    }
}

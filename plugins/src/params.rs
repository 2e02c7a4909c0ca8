//! Helpers plug-ins use to read their per-request parameters with errors naming the field.

use std::fmt::Debug;

use models::hooks::HookParams;
use models::PrefixReuse;
use serde_json::{Map, Value};

use crate::error::{PluginError, Result};

fn bad(plugin: &str, param: &str, message: impl ToString) -> PluginError {
    PluginError::BadParameter {
        plugin: plugin.to_string(),
        param: param.to_string(),
        message: message.to_string(),
    }
}

/// Fails on the first field not in `known`.
pub(crate) fn reject_unknown(
    plugin: &str,
    params: &Map<String, Value>,
    known: &[&str],
) -> Result<()> {
    match params.keys().find(|k| !known.contains(&k.as_str())) {
        None => Ok(()),
        Some(k) => Err(bad(
            plugin,
            k,
            format!(
                "is not a parameter of this plug-in type (known: {})",
                known.join(", ")
            ),
        )),
    }
}

/// A finite number within `[min, max]`, or `default` when absent.
pub(crate) fn number(
    plugin: &str,
    params: &Map<String, Value>,
    name: &str,
    default: f32,
    (min, max): (f32, f32),
) -> Result<f32> {
    let Some(v) = params.get(name) else {
        return Ok(default);
    };
    let x = v
        .as_f64()
        .ok_or_else(|| bad(plugin, name, format!("must be a number, got {v}")))? as f32;
    if !x.is_finite() || x < min || x > max {
        return Err(bad(
            plugin,
            name,
            format!("must be within [{min}, {max}], got {v}"),
        ));
    }
    Ok(x)
}

/// A whole number within `[min, max]`, or `None` when absent.
pub(crate) fn count(
    plugin: &str,
    params: &Map<String, Value>,
    name: &str,
    (min, max): (usize, usize),
) -> Result<Option<usize>> {
    let Some(v) = params.get(name) else {
        return Ok(None);
    };
    match v.as_u64() {
        Some(n) if (min as u64..=max as u64).contains(&n) => Ok(Some(n as usize)),
        _ => Err(bad(
            plugin,
            name,
            format!("must be a whole number within [{min}, {max}], got {v}"),
        )),
    }
}

/// `[first, last]`: an inclusive range of 0-based layers below `layers`.
pub(crate) fn layer_range(plugin: &str, v: &Value, layers: usize) -> Result<(usize, usize)> {
    let pair = v.as_array().filter(|a| a.len() == 2).and_then(|a| {
        let first = a[0].as_u64()? as usize;
        let last = a[1].as_u64()? as usize;
        Some((first, last))
    });
    match pair {
        Some((first, last)) if first <= last && last < layers => Ok((first, last)),
        _ => Err(bad(
            plugin,
            "layers",
            format!("must be [first, last] with 0 <= first <= last < {layers}, got {v}"),
        )),
    }
}

/// Prefix reuse keyed by every parameter of type `T` (their `Debug` text, exact for floats):
/// what a hook declares when any of its parameters changes the keys and values it leaves.
/// Parameters of another type (never expected) allow no reuse.
pub(crate) fn reuse_keyed_by<T: Debug + 'static>(params: &HookParams) -> PrefixReuse {
    match params.downcast_ref::<T>() {
        Some(p) => PrefixReuse::Keyed(format!("{p:?}")),
        None => PrefixReuse::Never,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn map(v: Value) -> Map<String, Value> {
        v.as_object().unwrap().clone()
    }

    #[test]
    fn numbers_are_checked_and_named() {
        let p = map(json!({"scale": 0.5}));
        assert_eq!(number("a", &p, "scale", 1.0, (-4.0, 4.0)).unwrap(), 0.5);
        assert_eq!(
            number("a", &Map::new(), "scale", 1.0, (-4.0, 4.0)).unwrap(),
            1.0
        );
        let e = number("a", &map(json!({"scale": "x"})), "scale", 1.0, (-4.0, 4.0));
        assert!(e
            .unwrap_err()
            .to_string()
            .contains("`scale` must be a number"));
        let e = number("a", &map(json!({"scale": 9})), "scale", 1.0, (-4.0, 4.0));
        assert!(e.unwrap_err().to_string().contains("within [-4, 4]"));
    }

    #[test]
    fn layer_ranges_are_inclusive_and_bounded() {
        assert_eq!(layer_range("a", &json!([2, 5]), 30).unwrap(), (2, 5));
        assert_eq!(layer_range("a", &json!([7, 7]), 30).unwrap(), (7, 7));
        for bad in [
            json!([5, 2]),
            json!([1, 30]),
            json!([1]),
            json!("1-3"),
            json!([-1, 2]),
        ] {
            let e = layer_range("a", &bad, 30).unwrap_err().to_string();
            assert!(e.contains("`layers` must be [first, last]"), "{bad}: {e}");
        }
    }

    #[test]
    fn unknown_parameters_are_named() {
        let e = reject_unknown("a", &map(json!({"scale": 1, "sclae": 2})), &["scale"]);
        let msg = e.unwrap_err().to_string();
        assert!(
            msg.contains("`sclae`") && msg.contains("known: scale"),
            "{msg}"
        );
    }

    #[test]
    fn prefix_reuse_is_keyed_by_the_exact_parameters() {
        use crate::lora::LoraParams;
        let key = |scale: f32| {
            let params: HookParams = std::sync::Arc::new(LoraParams { scale });
            reuse_keyed_by::<LoraParams>(&params)
        };
        assert_eq!(key(0.5), key(0.5));
        assert_ne!(key(0.5), key(0.5 + f32::EPSILON));
        let foreign: HookParams = std::sync::Arc::new(());
        assert_eq!(reuse_keyed_by::<LoraParams>(&foreign), PrefixReuse::Never);
    }
}

//! Helpers plug-ins use to read their per-request parameters with errors naming the field.

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
    fn unknown_parameters_are_named() {
        let e = reject_unknown("a", &map(json!({"scale": 1, "sclae": 2})), &["scale"]);
        let msg = e.unwrap_err().to_string();
        assert!(
            msg.contains("`sclae`") && msg.contains("known: scale"),
            "{msg}"
        );
    }
}

//! Who is calling: the [`Caller`] the auth middleware puts on every protected request, what
//! it may use (403 `model_not_allowed`, `plugin_not_allowed`, `admin_required` otherwise) and
//! the [`Meter`] that charges the tokens its generations use to its key.
//!
//! With authentication off every request is the anonymous caller, which may use everything.

use std::sync::Arc;
use std::time::Instant;

use axum::extract::FromRequestParts;
use axum::http::request::Parts;
use plugins::PluginSpec;

use super::keys::ApiKey;
use super::limits::KeyLimiter;
use crate::http::error::{ApiError, ErrorKind};

/// The key a request was authenticated with (none when authentication is off).
#[derive(Debug, Clone, Default)]
pub struct Caller {
    key: Option<Arc<ApiKey>>,
    limiter: Option<Arc<KeyLimiter>>,
}

impl Caller {
    /// Authentication is off: no name, no restriction, no limit.
    pub fn anonymous() -> Self {
        Self::default()
    }

    pub fn with_key(key: Arc<ApiKey>, limiter: Option<Arc<KeyLimiter>>) -> Self {
        Self {
            key: Some(key),
            limiter,
        }
    }

    /// The key's name (metrics label, logs).
    pub fn name(&self) -> Option<&str> {
        self.key.as_deref().map(|k| k.name.as_str())
    }

    pub fn limiter(&self) -> Option<&Arc<KeyLimiter>> {
        self.limiter.as_ref()
    }

    pub fn is_admin(&self) -> bool {
        self.key.as_deref().is_none_or(|k| k.access.admin)
    }

    /// 403 unless the caller may load, replace and unload plug-ins.
    pub fn require_admin(&self) -> Result<(), ApiError> {
        match self.is_admin() {
            true => Ok(()),
            false => Err(self.forbidden(
                ErrorKind::AdminRequired,
                "may not load, replace or unload plug-ins (`admin = true` in the key file)",
            )),
        }
    }

    /// 403 unless the caller may use `model` (the base model `base` when absent) and run
    /// every plug-in in `plugins`. A plug-in selected through `model` must be allowed by
    /// both lists, where they are set.
    pub fn check(
        &self,
        base: &str,
        model: Option<&str>,
        plugins: &[PluginSpec],
    ) -> Result<(), ApiError> {
        let Some(key) = self.key.as_deref() else {
            return Ok(());
        };
        let model = canonical(base, model.unwrap_or(base));
        if let Some(allowed) = &key.access.models {
            if !allowed.iter().any(|m| canonical(base, m) == model) {
                let message = format!("may not use the model `{model}`");
                return Err(self
                    .forbidden(ErrorKind::ModelNotAllowed, &message)
                    .with_param("model"));
            }
        }
        let Some(allowed) = &key.access.plugins else {
            return Ok(());
        };
        if model != base && !allowed.contains(model) {
            let message = format!("may not run the plug-in `{model}`");
            return Err(self
                .forbidden(ErrorKind::PluginNotAllowed, &message)
                .with_param("model"));
        }
        // A built-in plug-in, which requests name by type alone, is allowed by its type's name.
        let name = |p: &PluginSpec| match p.name.is_empty() {
            true => p.kind.name().to_string(),
            false => p.name.clone(),
        };
        match plugins.iter().position(|p| !allowed.contains(&name(p))) {
            None => Ok(()),
            Some(i) => {
                let message = format!("may not run the plug-in `{}`", name(&plugins[i]));
                Err(self
                    .forbidden(ErrorKind::PluginNotAllowed, &message)
                    .with_param(format!("plugins[{i}]")))
            }
        }
    }

    /// Whether the caller may see `model` listed (GET /v1/models).
    pub fn may_use_model(&self, base: &str, model: &str) -> bool {
        self.check(base, Some(model), &[]).is_ok()
    }

    /// Charges the tokens of the caller's generations to its key, for keys with a tokens
    /// per minute limit.
    pub fn meter(&self) -> Option<Meter> {
        self.limiter.clone().map(Meter)
    }

    fn forbidden(&self, kind: ErrorKind, what: &str) -> ApiError {
        let name = self.name().unwrap_or_default();
        ApiError::new(kind, format!("the API key `{name}` {what}"))
    }
}

/// `<base>::<name>` and `<name>` name the same adapter.
fn canonical<'a>(base: &str, model: &'a str) -> &'a str {
    match model.split_once("::") {
        Some((b, name)) if b == base => name,
        _ => model,
    }
}

/// Takes used tokens from a key's tokens-per-minute budget.
#[derive(Debug, Clone)]
pub struct Meter(Arc<KeyLimiter>);

impl Meter {
    pub fn charge(&self, tokens: usize) {
        if tokens > 0 {
            self.0.charge_tokens(tokens, Instant::now());
        }
    }
}

/// The caller the auth middleware stored; a handler outside the protected routes has none,
/// which is a wiring bug, so it fails closed.
impl<S: Send + Sync> FromRequestParts<S> for Caller {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, Self::Rejection> {
        parts.extensions.get::<Caller>().cloned().ok_or_else(|| {
            ApiError::new(
                ErrorKind::Internal,
                "the route has no authentication middleware",
            )
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::http::auth::keys::KeyTable;

    fn caller(toml: &str) -> Caller {
        let table = KeyTable::parse(toml).expect("parses");
        Caller::with_key(table.keys()[0].clone(), None)
    }

    fn spec(name: &str) -> PluginSpec {
        PluginSpec::named(plugins::PluginKind::Lora, name)
    }

    #[test]
    fn anonymous_may_do_everything() {
        let c = Caller::anonymous();
        assert!(c.check("base", Some("x"), &[spec("y")]).is_ok());
        assert!(c.require_admin().is_ok());
        assert!(c.name().is_none());
    }

    #[test]
    fn models_restrict_the_model_field_in_either_adapter_form() {
        let c = caller("[[keys]]\nname = \"a\"\nkey = \"k\"\nmodels = [\"base\", \"sql\"]\n");
        assert!(
            c.check("base", None, &[]).is_ok(),
            "absent means the base model"
        );
        assert!(c.check("base", Some("sql"), &[]).is_ok());
        assert!(c.check("base", Some("base::sql"), &[]).is_ok());
        let e = c.check("base", Some("chat"), &[]).unwrap_err();
        assert_eq!(e.kind, ErrorKind::ModelNotAllowed);
        assert_eq!(e.param.as_deref(), Some("model"));
        assert!(
            e.message.contains("`a`") && e.message.contains("`chat`"),
            "{e}"
        );
    }

    #[test]
    fn plugins_restrict_the_list_and_adapters_picked_by_model() {
        let c = caller("[[keys]]\nname = \"a\"\nkey = \"k\"\nplugins = [\"sql\"]\n");
        assert!(c.check("base", Some("base"), &[spec("sql")]).is_ok());
        let e = c
            .check("base", None, &[spec("sql"), spec("x")])
            .unwrap_err();
        assert_eq!(e.kind, ErrorKind::PluginNotAllowed);
        assert_eq!(e.param.as_deref(), Some("plugins[1]"));
        let e = c.check("base", Some("base::x"), &[]).unwrap_err();
        assert_eq!(e.kind, ErrorKind::PluginNotAllowed);
        assert_eq!(e.param.as_deref(), Some("model"));
        assert!(c.may_use_model("base", "sql"));
        assert!(!c.may_use_model("base", "x"));
    }

    #[test]
    fn a_built_in_plugin_is_allowed_by_its_type_name() {
        let speculative = PluginSpec::named(plugins::PluginKind::Speculative, "");
        let c = caller("[[keys]]\nname = \"a\"\nkey = \"k\"\nplugins = [\"sql\"]\n");
        let e = c
            .check("base", None, std::slice::from_ref(&speculative))
            .unwrap_err();
        assert!(e.message.contains("`speculative`"), "{e}");
        let c = caller("[[keys]]\nname = \"a\"\nkey = \"k\"\nplugins = [\"speculative\"]\n");
        assert!(c.check("base", None, &[speculative]).is_ok());
    }

    #[test]
    fn only_admin_keys_administer_plugins() {
        let c = caller("[[keys]]\nname = \"a\"\nkey = \"k\"\n");
        let e = c.require_admin().unwrap_err();
        assert_eq!(e.kind, ErrorKind::AdminRequired);
        let c = caller("[[keys]]\nname = \"a\"\nkey = \"k\"\nadmin = true\n");
        assert!(c.require_admin().is_ok());
    }
}

//! The API-key table: every accepted key with its name, what it may use and its limits, read
//! from `--api-key` flags and the `--api-key-file` at start-up.
//!
//! The file is either today's format, one key per line (`#` comments and blank lines
//! ignored), or TOML `[[keys]]` tables when its first line that is not blank or a comment
//! starts with `[`. Only the SHA-256 of a key is kept, whichever way it was given: a lookup
//! hashes the presented token and compares digests in constant time, so neither the table in
//! memory nor the time a comparison takes gives a key away. Keys never reach a log or an
//! error message: errors name the line and field, never the value.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::fmt;
use std::sync::Arc;

use serde::de::Error as _;
use serde::{Deserialize, Deserializer};
use sha2::{Digest, Sha256};

/// A SHA-256 digest of a key.
type KeyDigest = [u8; 32];

/// Why the keys cannot be used; the message names the line and field, never a key.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum KeyFileError {
    /// A problem at one line of the key file.
    #[error("line {line}: {message}")]
    Line { line: usize, message: String },
    /// A problem with a key given on the command line (`--api-key`, 1-based position).
    #[error("key {position} of api_key: {message}")]
    Flag { position: usize, message: String },
    /// A problem with a table built in code.
    #[error("{0}")]
    Table(String),
}

/// Where a key came from, for errors.
#[derive(Debug, Clone, Copy)]
enum Place {
    Line(usize),
    Flag(usize),
    Code,
}

impl Place {
    fn error(self, message: String) -> KeyFileError {
        match self {
            Self::Line(line) => KeyFileError::Line { line, message },
            Self::Flag(position) => KeyFileError::Flag { position, message },
            Self::Code => KeyFileError::Table(message),
        }
    }
}

/// What a key may use. `None` means no restriction.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Access {
    /// Model ids the key may put in `model`: the base model's id and adapter names.
    pub models: Option<BTreeSet<String>>,
    /// Plug-ins the key may run, whether named in `plugins` or selected through `model`.
    pub plugins: Option<BTreeSet<String>>,
    /// Whether the key may load, replace and unload plug-ins (POST/DELETE /v1/plugins).
    pub admin: bool,
}

impl Access {
    /// Everything, as for keys given without a table (`--api-key`, plain lines).
    pub fn full() -> Self {
        Self {
            models: None,
            plugins: None,
            admin: true,
        }
    }
}

/// A key's limits. `None` means no limit.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Limits {
    pub requests_per_minute: Option<u32>,
    /// Prompt plus generated tokens per minute.
    pub tokens_per_minute: Option<u32>,
    /// Requests in flight at once (a streamed response counts until its last byte).
    pub max_concurrent: Option<u32>,
}

impl Limits {
    pub fn is_unlimited(&self) -> bool {
        *self == Self::default()
    }
}

/// One accepted key. Its `Debug` shows the name, never the digest.
#[derive(Clone, PartialEq, Eq)]
pub struct ApiKey {
    /// A non-secret name: the metrics label and what logs and errors show.
    pub name: String,
    digest: KeyDigest,
    pub access: Access,
    pub limits: Limits,
}

impl fmt::Debug for ApiKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ApiKey")
            .field("name", &self.name)
            .field("access", &self.access)
            .field("limits", &self.limits)
            .finish_non_exhaustive()
    }
}

impl ApiKey {
    /// A key with full access and no limits.
    pub fn new(name: impl Into<String>, key: &str) -> Self {
        Self {
            name: name.into(),
            digest: sha256(key),
            access: Access::full(),
            limits: Limits::default(),
        }
    }
}

/// Every accepted key; empty means authentication is off.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct KeyTable {
    keys: Vec<Arc<ApiKey>>,
}

impl KeyTable {
    /// The table, refusing two keys with one name (metrics and limits go by name) or one key
    /// under two names (a request must resolve to one key).
    pub fn new(keys: Vec<ApiKey>) -> Result<Self, KeyFileError> {
        Self::checked(keys.into_iter().map(|k| (Place::Code, k)).collect())
    }

    /// `flags` (`--api-key`, named `api-key-1`, ...) and the key file's text.
    pub fn from_sources(flags: &[String], file: Option<&str>) -> Result<Self, KeyFileError> {
        let mut keys = Vec::new();
        for (i, key) in flags.iter().enumerate() {
            let key = key.trim();
            if key.is_empty() {
                continue;
            }
            let place = Place::Flag(i + 1);
            check_plain(key).map_err(|message| place.error(message))?;
            keys.push((place, ApiKey::new(format!("api-key-{}", i + 1), key)));
        }
        if let Some(text) = file {
            keys.extend(parse(text)?);
        }
        Self::checked(keys)
    }

    /// The key file's text alone (either format).
    pub fn parse(text: &str) -> Result<Self, KeyFileError> {
        Self::checked(parse(text)?)
    }

    fn checked(keys: Vec<(Place, ApiKey)>) -> Result<Self, KeyFileError> {
        let mut names = HashSet::new();
        let mut digests: HashMap<KeyDigest, &str> = HashMap::new();
        for (place, key) in &keys {
            if !names.insert(key.name.as_str()) {
                return Err(place.error(format!("the name `{}` is used twice", key.name)));
            }
            if let Some(other) = digests.insert(key.digest, &key.name) {
                let message = format!("`{}` is the same key as `{other}`", key.name);
                return Err(place.error(message));
            }
        }
        let keys = keys.into_iter().map(|(_, k)| Arc::new(k)).collect();
        Ok(Self { keys })
    }

    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }

    pub fn len(&self) -> usize {
        self.keys.len()
    }

    pub fn keys(&self) -> &[Arc<ApiKey>] {
        &self.keys
    }

    /// The position of the key `token` is, if any. Every key is compared, matched or not,
    /// and digests rather than keys: an attacker who could time the comparison would learn
    /// how much of a digest matched, which does not help guess a key.
    pub fn find(&self, token: &str) -> Option<usize> {
        let digest = sha256(token);
        self.keys.iter().enumerate().fold(None, |found, (i, key)| {
            let equal = digests_equal(&key.digest, &digest);
            found.or(equal.then_some(i))
        })
    }
}

fn sha256(text: &str) -> KeyDigest {
    Sha256::digest(text.as_bytes()).into()
}

/// Compares every byte whatever the first difference; `black_box` keeps the compiler from
/// turning the fold back into an early exit.
fn digests_equal(a: &KeyDigest, b: &KeyDigest) -> bool {
    let diff = a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y));
    std::hint::black_box(diff) == 0
}

/// Either format; each key with the line it is on.
fn parse(text: &str) -> Result<Vec<(Place, ApiKey)>, KeyFileError> {
    let first = text
        .lines()
        .map(str::trim)
        .find(|l| !l.is_empty() && !l.starts_with('#'));
    match first {
        Some(line) if line.starts_with('[') => parse_toml(text),
        _ => parse_lines(text),
    }
}

/// One key per line, each named `key-<line>`.
fn parse_lines(text: &str) -> Result<Vec<(Place, ApiKey)>, KeyFileError> {
    let mut keys = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let key = line.trim();
        if key.is_empty() || key.starts_with('#') {
            continue;
        }
        let place = Place::Line(i + 1);
        check_plain(key).map_err(|message| place.error(message))?;
        keys.push((place, ApiKey::new(format!("key-{}", i + 1), key)));
    }
    Ok(keys)
}

/// A bearer token is one word; a line with spaces is most likely a TOML table gone wrong.
fn check_plain(key: &str) -> Result<(), String> {
    match key.contains(char::is_whitespace) {
        true => Err(
            "a key must not contain whitespace (a TOML key file starts with \
                     `[[keys]]`)"
                .into(),
        ),
        false => Ok(()),
    }
}

/// The TOML form: `[[keys]]` tables.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct KeyFile {
    #[serde(default)]
    keys: Vec<toml::Spanned<KeyEntry>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct KeyEntry {
    name: String,
    key: Option<Secret>,
    sha256: Option<Secret>,
    models: Option<BTreeSet<String>>,
    plugins: Option<BTreeSet<String>>,
    #[serde(default)]
    admin: bool,
    requests_per_minute: Option<u32>,
    tokens_per_minute: Option<u32>,
    max_concurrent: Option<u32>,
}

/// A string that never appears in an error: serde's own type errors quote the value they
/// reject, so anything but a string is refused with a fixed message.
struct Secret(String);

impl<'de> Deserialize<'de> for Secret {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        match toml::Value::deserialize(d) {
            Ok(toml::Value::String(s)) => Ok(Self(s)),
            _ => Err(D::Error::custom("must be a string")),
        }
    }
}

fn parse_toml(text: &str) -> Result<Vec<(Place, ApiKey)>, KeyFileError> {
    // The error's message, never its `Display`: that quotes the offending line.
    let file: KeyFile = toml::from_str(text).map_err(|e| KeyFileError::Line {
        line: e.span().map_or(1, |s| line_of(text, s.start)),
        message: e.message().trim().to_string(),
    })?;
    file.keys
        .into_iter()
        .map(|entry| {
            let place = Place::Line(line_of(text, entry.span().start));
            let key = entry.into_inner().into_key().map_err(|m| place.error(m))?;
            Ok((place, key))
        })
        .collect()
}

/// The 1-based line holding byte `offset`.
fn line_of(text: &str, offset: usize) -> usize {
    let end = offset.min(text.len());
    text.as_bytes()[..end]
        .iter()
        .filter(|&&b| b == b'\n')
        .count()
        + 1
}

impl KeyEntry {
    fn into_key(self) -> Result<ApiKey, String> {
        check_name(&self.name)?;
        let named = |message: &str| format!("key `{}`: {message}", self.name);
        let digest = match (&self.key, &self.sha256) {
            (Some(key), None) => {
                check_plain(&key.0).map_err(|m| named(&m))?;
                sha256(&key.0)
            }
            (None, Some(hex)) => parse_hex_digest(&hex.0)
                .ok_or_else(|| named("`sha256` must be 64 hexadecimal digits"))?,
            _ => return Err(named("give exactly one of `key` and `sha256`")),
        };
        let limits = Limits {
            requests_per_minute: self.requests_per_minute,
            tokens_per_minute: self.tokens_per_minute,
            max_concurrent: self.max_concurrent,
        };
        let fields = [
            ("requests_per_minute", limits.requests_per_minute),
            ("tokens_per_minute", limits.tokens_per_minute),
            ("max_concurrent", limits.max_concurrent),
        ];
        if let Some((field, _)) = fields.iter().find(|(_, v)| *v == Some(0)) {
            return Err(named(&format!(
                "`{field}` must be at least 1 (leave it out for no limit)"
            )));
        }
        Ok(ApiKey {
            name: self.name,
            digest,
            access: Access {
                models: self.models,
                plugins: self.plugins,
                admin: self.admin,
            },
            limits,
        })
    }
}

/// Names label metrics and appear in logs: short, and nothing that needs quoting.
fn check_name(name: &str) -> Result<(), String> {
    let allowed = |c: char| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-');
    match (1..=64).contains(&name.len()) && name.chars().all(allowed) {
        true => Ok(()),
        false => Err("`name` must be 1 to 64 letters, digits, `.`, `_` or `-`".into()),
    }
}

fn parse_hex_digest(hex: &str) -> Option<KeyDigest> {
    let hex = hex.trim().as_bytes();
    if hex.len() != 64 {
        return None;
    }
    let mut digest = [0u8; 32];
    for (byte, pair) in digest.iter_mut().zip(hex.chunks_exact(2)) {
        let pair = std::str::from_utf8(pair).ok()?;
        *byte = u8::from_str_radix(pair, 16).ok()?;
    }
    Some(digest)
}

#[cfg(test)]
mod tests {
    use super::*;

    const TOML: &str = r#"
# team keys
[[keys]]
name = "alice"
key = "sk-alice"
models = ["fake-model"]
plugins = ["sql"]
requests_per_minute = 60
tokens_per_minute = 1000
max_concurrent = 2

[[keys]]
name = "ops"
# sha256 of "sk-ops"
sha256 = "HASH"
admin = true
"#;

    fn hex(digest: &KeyDigest) -> String {
        digest.iter().map(|b| format!("{b:02x}")).collect()
    }

    fn toml_table() -> KeyTable {
        let text = TOML.replace("HASH", &hex(&sha256("sk-ops")));
        KeyTable::parse(&text).expect("parses")
    }

    #[test]
    fn plain_lines_are_keys_named_by_line() {
        let table = KeyTable::parse("# keys\nk1\n\n  k2  \n").expect("parses");
        let names: Vec<&str> = table.keys().iter().map(|k| k.name.as_str()).collect();
        assert_eq!(names, ["key-2", "key-4"]);
        assert_eq!(table.find("k2"), Some(1));
        assert_eq!(table.find("k3"), None);
        assert_eq!(table.keys()[0].access, Access::full());
        assert!(table.keys()[0].limits.is_unlimited());
    }

    #[test]
    fn toml_tables_give_access_and_limits() {
        let table = toml_table();
        let alice = &table.keys()[table.find("sk-alice").expect("alice")];
        assert_eq!(alice.name, "alice");
        assert!(!alice.access.admin);
        let models = alice.access.models.as_ref().expect("models");
        assert!(models.contains("fake-model"));
        assert_eq!(alice.limits.requests_per_minute, Some(60));
        assert_eq!(alice.limits.tokens_per_minute, Some(1000));
        assert_eq!(alice.limits.max_concurrent, Some(2));
    }

    #[test]
    fn sha256_entries_match_the_key_whose_digest_they_hold() {
        let table = toml_table();
        let ops = &table.keys()[table.find("sk-ops").expect("ops")];
        assert_eq!(ops.name, "ops");
        assert!(ops.access.admin);
        assert_eq!(ops.access.models, None);
        let upper = TOML.replace("HASH", &hex(&sha256("sk-ops")).to_uppercase());
        let table = KeyTable::parse(&upper).expect("upper-case hex parses");
        assert!(table.find("sk-ops").is_some());
        assert_eq!(
            table.find(&hex(&sha256("sk-ops"))),
            None,
            "the digest is no key"
        );
    }

    #[test]
    fn unknown_fields_are_refused_naming_the_line_and_field() {
        let text = "[[keys]]\nname = \"a\"\nkey = \"sk-a\"\nrpm = 5\n";
        let e = KeyTable::parse(text).unwrap_err().to_string();
        assert!(e.starts_with("line 4: "), "{e}");
        assert!(e.contains("unknown field `rpm`"), "{e}");
        let e = KeyTable::parse("[[key]]\nname = \"a\"\n").unwrap_err();
        assert!(e.to_string().contains("unknown field `key`"), "{e}");
    }

    #[test]
    fn errors_never_quote_a_key() {
        let secret = "sk-very-secret-123";
        for text in [
            format!("[[keys]]\nname = \"a\"\nkey = \"{secret}\"\nrpm = 1\n"),
            format!("[[keys]]\nname = \"a\"\nkey = \"{secret}\n"),
            format!("[[keys]]\nname = \"a\"\nkey = [\"{secret}\"]\n"),
            format!("[[keys]]\nname = \"a\"\nsha256 = \"{secret}\"\n"),
            format!("[[keys]]\nname = \"a\"\nkey = \"{secret}\"\nsha256 = \"00\"\n"),
            format!("[[keys]]\nname = \"a b\"\nkey = \"{secret}\"\n"),
            format!("{secret}\n{secret}\n"),
            format!("{secret} {secret}\n"),
        ] {
            let e = KeyTable::parse(&text).unwrap_err();
            let shown = format!("{e} {e:?}");
            assert!(!shown.contains(secret), "{shown}");
            assert!(!shown.contains("very-secret"), "{shown}");
        }
        let table = KeyTable::parse(secret).expect("parses");
        assert!(!format!("{table:?}").contains(secret));
    }

    #[test]
    fn entries_need_one_secret_a_good_name_and_nonzero_limits() {
        for (text, expected) in [
            (
                "[[keys]]\nname = \"a\"\n",
                "exactly one of `key` and `sha256`",
            ),
            (
                "[[keys]]\nname = \"a\"\nkey = \"k\"\nsha256 = \"00\"\n",
                "exactly one",
            ),
            (
                "[[keys]]\nname = \"a\"\nsha256 = \"abc\"\n",
                "64 hexadecimal",
            ),
            ("[[keys]]\nname = \"a/b\"\nkey = \"k\"\n", "`name` must be"),
            (
                "[[keys]]\nname = \"a\"\nkey = \"k\"\nmax_concurrent = 0\n",
                "`max_concurrent` must be at least 1",
            ),
            (
                "[[keys]]\nname = \"a\"\nkey = \"k\"\n[[keys]]\nname = \"a\"\nkey = \"j\"\n",
                "line 4: the name `a` is used twice",
            ),
            (
                "[[keys]]\nname = \"a\"\nkey = \"k\"\n[[keys]]\nname = \"b\"\nkey = \"k\"\n",
                "`b` is the same key as `a`",
            ),
        ] {
            let e = KeyTable::parse(text).unwrap_err().to_string();
            assert!(e.contains(expected), "{text}: {e}");
        }
    }

    #[test]
    fn flag_keys_come_first_and_clash_with_file_keys() {
        let flags = ["f1".to_string(), " ".to_string(), "f2".to_string()];
        let table = KeyTable::from_sources(&flags, Some("k1\n")).expect("keys");
        let names: Vec<&str> = table.keys().iter().map(|k| k.name.as_str()).collect();
        assert_eq!(names, ["api-key-1", "api-key-3", "key-1"]);
        let e = KeyTable::from_sources(&["k1".to_string()], Some("k1\n")).unwrap_err();
        assert_eq!(
            e.to_string(),
            "line 1: `key-1` is the same key as `api-key-1`"
        );
        let e = KeyTable::from_sources(&["a b".to_string()], None).unwrap_err();
        assert!(e.to_string().starts_with("key 1 of api_key: "), "{e}");
    }

    #[test]
    fn digests_are_compared_whole() {
        let a = sha256("a");
        let mut b = a;
        assert!(digests_equal(&a, &b));
        b[31] ^= 1;
        assert!(!digests_equal(&a, &b));
        b = a;
        b[0] ^= 0x80;
        assert!(!digests_equal(&a, &b));
    }

    #[test]
    fn every_key_is_compared_and_the_first_match_wins() {
        let table =
            KeyTable::new(vec![ApiKey::new("a", "x"), ApiKey::new("b", "y")]).expect("table");
        assert_eq!(table.find("y"), Some(1));
        assert_eq!(table.find("x"), Some(0));
        assert_eq!(table.find(""), None);
    }
}

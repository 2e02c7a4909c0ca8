//! `server serve` configuration: ONE struct, [`ServeConfig`], read from command-line flags,
//! `GRAFT_*` environment variables and a TOML file (`--config FILE`), with precedence flags >
//! environment > file > defaults (mistral.rs's `#[derive(Args, Deserialize)]` pattern).
//!
//! clap parses flags and environment variables into the struct and remembers where each
//! value came from; serde reads the file into the same struct. [`resolve`] starts from the
//! file (defaults filling what it leaves out) and overrides every option clap saw on the
//! command line or in the environment. `config/default.toml` lists every option with its
//! default; a test keeps the two in sync.

use std::path::{Path, PathBuf};

use std::time::Duration;

use clap::parser::ValueSource;
use clap::{ArgMatches, Args, ValueEnum};

use crate::tools::ToolCallParser;
use serde::{Deserialize, Serialize};

use crate::http::auth::{KeyFileError, KeyTable};
use crate::http::cors::AllowedOrigins;
use crate::http::images;

/// The served name of the default model.
pub const DEFAULT_MODEL_ID: &str = "smollm2-135m-instruct";

/// Default values, shared by clap's `default_value_t` and `impl Default` so they cannot drift.
pub mod defaults {
    pub const HOST: &str = "127.0.0.1";
    pub const PORT: u16 = 8080;
    pub const MAX_RUNNING: usize = 16;
    pub const MAX_BATCH_TOKENS: usize = 512;
    pub const PREFILL_CHUNK: usize = 256;
    pub const SPECULATIVE_DISABLE_BY_BATCH_SIZE: usize = 4;
    pub const MAX_WAITING: usize = 256;
    pub const KV_BUDGET_MIB: usize = 1024;
    pub const MAX_BODY_BYTES: usize = 2 * 1024 * 1024;
    pub const DRAIN_SECONDS: u64 = 30;
    pub const MAX_TOKENS_DEFAULT: usize = 512;
    pub const PLUGIN_MEMORY_MIB: usize = 512;
    pub const REQUEST_TIMEOUT: u64 = 0;
}

/// Log line format.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, ValueEnum, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// Human-readable lines.
    #[default]
    Text,
    /// One JSON object per line.
    Json,
}

/// How sequences' KV caches store keys and values.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, ValueEnum, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum KvCacheDtype {
    /// Keys and values as computed.
    F32,
    /// Half the memory and half the bytes attention reads (llama.cpp's and vLLM's default);
    /// each key and value rounded to f16 once, when written: 0.0008 nats from the reference
    /// teacher-forced on the default model, against 0.0003 for f32.
    #[default]
    F16,
    /// As f16 in memory and speed, with f32's range and 3 fewer mantissa bits.
    Bf16,
    /// llama.cpp's q8_0 blocks (34 bytes per 32 values, 8.5 bits each); CPU only.
    #[value(name = "q8_0")]
    #[serde(rename = "q8_0")]
    Q8_0,
}

impl KvCacheDtype {
    pub fn dtype(self) -> models::KvDtype {
        match self {
            Self::F32 => models::KvDtype::F32,
            Self::F16 => models::KvDtype::F16,
            Self::Bf16 => models::KvDtype::Bf16,
            Self::Q8_0 => models::KvDtype::Q8_0,
        }
    }
}

/// How the CPU's 8-bit kernels quantize activations.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, ValueEnum, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Activations {
    /// Values and their rounding error: float accuracy (~0.002 nats), chunking-invariant.
    #[default]
    TwoPass,
    /// One 8-bit pass as llama.cpp: faster prefill and large batches, up to ~0.4 nats off.
    Single,
}

impl Activations {
    pub fn mode(self) -> models::linear::ActivationQuantization {
        match self {
            Self::TwoPass => models::linear::ActivationQuantization::TwoPass,
            Self::Single => models::linear::ActivationQuantization::Single,
        }
    }
}

/// Where the model runs.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, ValueEnum, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DeviceKind {
    #[default]
    Cpu,
    /// The first CUDA GPU; needs a binary built with `--features cuda`.
    Cuda,
}

/// Every `serve` option. Field names are the TOML keys; flags are `--field-name`; the
/// environment variable is `GRAFT_FIELD_NAME`.
#[derive(Debug, Clone, PartialEq, Args, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ServeConfig {
    /// Model to serve: a .gguf file or a Hugging Face folder [default: SmolLM2-135M-Instruct,
    /// fetched on first use]
    #[arg(long, env = "GRAFT_MODEL")]
    pub model: Option<PathBuf>,
    /// A vision tower for a text-only model: a folder `server train vision` wrote for this
    /// model's tokenizer; chat requests may then carry images
    #[arg(long, env = "GRAFT_VISION")]
    pub vision: Option<PathBuf>,
    /// Name clients put in `model` [default: smollm2-135m-instruct for the default model, else
    /// the file name without extension]
    #[arg(long, env = "GRAFT_MODEL_ID")]
    pub model_id: Option<String>,
    /// Address to listen on
    #[arg(long, env = "GRAFT_HOST", default_value = defaults::HOST)]
    pub host: String,
    /// Port to listen on
    #[arg(long, env = "GRAFT_PORT", default_value_t = defaults::PORT)]
    pub port: u16,
    /// Accepted API key (repeatable; comma-separated in GRAFT_API_KEY); none = no auth
    #[arg(
        long,
        env = "GRAFT_API_KEY",
        value_delimiter = ',',
        hide_env_values = true
    )]
    pub api_key: Vec<String>,
    /// API key file: one key per line (# comments and blank lines ignored), or TOML
    /// [[keys]] tables with names, allowed models and plug-ins, admin and limits
    #[arg(long, env = "GRAFT_API_KEY_FILE")]
    pub api_key_file: Option<PathBuf>,
    /// Most sequences in the running batch
    #[arg(long, env = "GRAFT_MAX_RUNNING", default_value_t = defaults::MAX_RUNNING)]
    pub max_running: usize,
    /// Most tokens in one forward step (prefill chunks plus decode rows)
    #[arg(long, env = "GRAFT_MAX_BATCH_TOKENS", default_value_t = defaults::MAX_BATCH_TOKENS)]
    pub max_batch_tokens: usize,
    /// Longest prefill chunk of one sequence per step
    #[arg(long, env = "GRAFT_PREFILL_CHUNK", default_value_t = defaults::PREFILL_CHUNK)]
    pub prefill_chunk: usize,
    /// Speculative decoding (a request's `speculative` plug-in) verifies drafts only in
    /// steps with at most this many decoding sequences; 0 turns it off (vLLM's
    /// disable_by_batch_size)
    #[arg(
        long,
        env = "GRAFT_SPECULATIVE_DISABLE_BY_BATCH_SIZE",
        default_value_t = defaults::SPECULATIVE_DISABLE_BY_BATCH_SIZE
    )]
    pub speculative_disable_by_batch_size: usize,
    /// Keep ended requests' KV caches (within --kv-budget-mib, least recently used evicted
    /// first) and start later prompts with the same prefix from them; false turns it off
    #[arg(
        long,
        env = "GRAFT_PREFIX_CACHING",
        default_value_t = true,
        action = clap::ArgAction::Set
    )]
    pub prefix_caching: bool,
    /// Most requests waiting for a slot; beyond that requests get 429
    #[arg(long, env = "GRAFT_MAX_WAITING", default_value_t = defaults::MAX_WAITING)]
    pub max_waiting: usize,
    /// KV cache memory budget in MiB
    #[arg(long, env = "GRAFT_KV_BUDGET_MIB", default_value_t = defaults::KV_BUDGET_MIB)]
    pub kv_budget_mib: usize,
    /// How KV caches store keys and values: f16 (half the memory and the bandwidth of
    /// attention at depth) or f32
    #[arg(long, env = "GRAFT_KV_CACHE_DTYPE", value_enum, default_value_t = KvCacheDtype::F16)]
    pub kv_cache_dtype: KvCacheDtype,
    /// Longest prompt plus completion in tokens [default: the model's trained context]
    #[arg(long, env = "GRAFT_MAX_CONTEXT")]
    pub max_context: Option<usize>,
    /// Largest request body in bytes (413 beyond); a data: URL image counts 4/3 of its bytes
    #[arg(long, env = "GRAFT_MAX_BODY_BYTES", default_value_t = defaults::MAX_BODY_BYTES)]
    pub max_body_bytes: usize,
    /// Images one chat request may carry (400 beyond)
    #[arg(long, env = "GRAFT_MAX_IMAGES_PER_REQUEST", default_value_t = images::defaults::MAX_IMAGES)]
    pub max_images_per_request: usize,
    /// Largest image in a request, in bytes once its base64 is decoded (400 beyond)
    #[arg(long, env = "GRAFT_MAX_IMAGE_BYTES", default_value_t = images::defaults::MAX_IMAGE_BYTES)]
    pub max_image_bytes: usize,
    /// Largest image in a request, in pixels as its header declares them (400 beyond)
    #[arg(long, env = "GRAFT_MAX_IMAGE_PIXELS", default_value_t = images::defaults::MAX_IMAGE_PIXELS)]
    pub max_image_pixels: u64,
    /// Hosts whose http(s) image URLs the server fetches (exact names, host:port for a port other
    /// than the scheme's default; repeatable or comma-separated); none = image URLs are refused
    /// and images must be sent as data: URLs
    #[arg(long, env = "GRAFT_ALLOWED_MEDIA_DOMAINS", value_delimiter = ',')]
    pub allowed_media_domains: Vec<String>,
    /// Seconds one image URL may take to fetch, body included
    #[arg(long, env = "GRAFT_MEDIA_FETCH_TIMEOUT", default_value_t = images::defaults::FETCH_TIMEOUT)]
    pub media_fetch_timeout: u64,
    /// Seconds in-flight requests may take to finish after SIGINT/SIGTERM
    #[arg(long, env = "GRAFT_DRAIN_SECONDS", default_value_t = defaults::DRAIN_SECONDS)]
    pub drain_seconds: u64,
    /// Seconds a generation may run before it is cancelled with a 408 (or an error event in
    /// its stream); 0 = no limit
    #[arg(long, env = "GRAFT_REQUEST_TIMEOUT", default_value_t = defaults::REQUEST_TIMEOUT)]
    pub request_timeout: u64,
    /// Origins browsers may call from, for CORS (repeatable; comma-separated in
    /// GRAFT_ALLOWED_ORIGINS), e.g. https://app.example.com, or * for any; none = no CORS
    #[arg(long, env = "GRAFT_ALLOWED_ORIGINS", value_delimiter = ',')]
    pub allowed_origins: Vec<String>,
    /// Jinja chat template file overriding the model's
    #[arg(long, env = "GRAFT_CHAT_TEMPLATE")]
    pub chat_template: Option<PathBuf>,
    /// The format the model writes tool calls in, parsed into `tool_calls` (and the format of
    /// the fallback prompt for templates that ignore `tools`)
    #[arg(
        long,
        env = "GRAFT_TOOL_CALL_PARSER",
        value_enum,
        default_value_t = ToolCallParser::Hermes
    )]
    pub tool_call_parser: ToolCallParser,
    /// Log format
    #[arg(long, env = "GRAFT_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,
    /// max_tokens when a request gives none; 0 = the rest of the context (always clamped to it)
    #[arg(long, env = "GRAFT_MAX_TOKENS_DEFAULT", default_value_t = defaults::MAX_TOKENS_DEFAULT)]
    pub max_tokens_default: usize,
    /// Where the model runs
    #[arg(long, env = "GRAFT_DEVICE", value_enum, default_value_t = DeviceKind::Cpu)]
    pub device: DeviceKind,
    /// Activation quantization of the CPU's 8-bit kernels: two-pass (accurate) or single
    /// (llama.cpp's numerics, faster where compute-bound)
    #[arg(long, env = "GRAFT_ACTIVATIONS", value_enum, default_value_t = Activations::TwoPass)]
    pub activations: Activations,
    /// Folder plug-in paths must lie under (config entries and POST /v1/plugins); unset: no
    /// plug-ins can be loaded
    #[arg(long, env = "GRAFT_PLUGIN_DIR")]
    pub plugin_dir: Option<PathBuf>,
    /// Memory for resident plug-in tensors in MiB; idle plug-ins are evicted beyond it
    #[arg(long, env = "GRAFT_PLUGIN_MEMORY_MIB", default_value_t = defaults::PLUGIN_MEMORY_MIB)]
    pub plugin_memory_mib: usize,
    /// Plug-in loaded at start-up, as TYPE:NAME=PATH (repeatable; comma-separated in
    /// GRAFT_PLUGIN), e.g. lora:sql=adapters/sql
    #[arg(long, env = "GRAFT_PLUGIN", value_delimiter = ',')]
    pub plugin: Vec<String>,
}

/// One `plugin` entry: `TYPE:NAME=PATH`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PluginEntry {
    pub kind: plugins::PluginKind,
    pub name: String,
    pub path: PathBuf,
}

impl PluginEntry {
    pub fn parse(text: &str) -> Result<Self, ConfigError> {
        let invalid = || ConfigError::Invalid {
            option: "plugin",
            message: format!("`{text}` is not TYPE:NAME=PATH (e.g. lora:sql=adapters/sql)"),
        };
        let (kind, rest) = text.split_once(':').ok_or_else(invalid)?;
        let (name, path) = rest.split_once('=').ok_or_else(invalid)?;
        if kind.is_empty() || name.is_empty() || path.is_empty() {
            return Err(invalid());
        }
        let kind = plugins::PluginKind::parse(kind.trim()).map_err(|e| ConfigError::Invalid {
            option: "plugin",
            message: format!("`{text}`: {e}"),
        })?;
        Ok(Self {
            kind,
            name: name.trim().to_string(),
            path: PathBuf::from(path.trim()),
        })
    }
}

impl Default for ServeConfig {
    fn default() -> Self {
        use defaults::*;
        Self {
            model: None,
            vision: None,
            model_id: None,
            host: HOST.to_string(),
            port: PORT,
            api_key: Vec::new(),
            api_key_file: None,
            max_running: MAX_RUNNING,
            max_batch_tokens: MAX_BATCH_TOKENS,
            prefill_chunk: PREFILL_CHUNK,
            speculative_disable_by_batch_size: SPECULATIVE_DISABLE_BY_BATCH_SIZE,
            prefix_caching: true,
            max_waiting: MAX_WAITING,
            kv_budget_mib: KV_BUDGET_MIB,
            kv_cache_dtype: KvCacheDtype::F16,
            max_context: None,
            max_body_bytes: MAX_BODY_BYTES,
            max_images_per_request: images::defaults::MAX_IMAGES,
            max_image_bytes: images::defaults::MAX_IMAGE_BYTES,
            max_image_pixels: images::defaults::MAX_IMAGE_PIXELS,
            allowed_media_domains: Vec::new(),
            media_fetch_timeout: images::defaults::FETCH_TIMEOUT,
            drain_seconds: DRAIN_SECONDS,
            request_timeout: REQUEST_TIMEOUT,
            allowed_origins: Vec::new(),
            chat_template: None,
            tool_call_parser: ToolCallParser::Hermes,
            log_format: LogFormat::Text,
            max_tokens_default: MAX_TOKENS_DEFAULT,
            device: DeviceKind::Cpu,
            activations: Activations::TwoPass,
            plugin_dir: None,
            plugin_memory_mib: PLUGIN_MEMORY_MIB,
            plugin: Vec::new(),
        }
    }
}

/// Why the configuration cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: {source}")]
    Parse {
        path: PathBuf,
        source: Box<toml::de::Error>,
    },
    #[error("{option}: {message}")]
    Invalid {
        option: &'static str,
        message: String,
    },
    #[error("cannot write the configuration as TOML: {0}")]
    Serialize(#[from] toml::ser::Error),
    #[error("cannot combine the configuration sources: {0}")]
    Merge(Box<toml::de::Error>),
    #[error("api_key_file {path}: {source}")]
    KeyFile { path: PathBuf, source: KeyFileError },
    #[error("{0}")]
    Keys(KeyFileError),
}

fn read(path: &Path) -> Result<String, ConfigError> {
    std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
        path: path.to_path_buf(),
        source,
    })
}

/// Reads the TOML file at `path` (defaults fill what it leaves out).
pub fn from_file(path: &Path) -> Result<ServeConfig, ConfigError> {
    toml::from_str(&read(path)?).map_err(|e| ConfigError::Parse {
        path: path.to_path_buf(),
        source: Box::new(e),
    })
}

/// The effective configuration: `file` (or the defaults), overridden by every option that
/// `matches` says came from the command line or the environment, taken from `cli`.
pub fn resolve(
    cli: &ServeConfig,
    matches: &ArgMatches,
    file: Option<ServeConfig>,
) -> Result<ServeConfig, ConfigError> {
    let mut merged = toml::Table::try_from(file.unwrap_or_default())?;
    let given = toml::Table::try_from(cli)?;
    for id in matches.ids() {
        let explicit = matches!(
            matches.value_source(id.as_str()),
            Some(ValueSource::CommandLine | ValueSource::EnvVariable)
        );
        // Ids that are not config fields (`--config`, `--print-config`) are not in `given`.
        if let (true, Some(value)) = (explicit, given.get(id.as_str())) {
            merged.insert(id.to_string(), value.clone());
        }
    }
    merged
        .try_into()
        .map_err(|e| ConfigError::Merge(Box::new(e)))
}

impl ServeConfig {
    /// Range checks the engine and HTTP layer rely on.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let positive = [
            ("max_running", self.max_running),
            ("max_batch_tokens", self.max_batch_tokens),
            ("prefill_chunk", self.prefill_chunk),
            ("max_waiting", self.max_waiting),
            ("kv_budget_mib", self.kv_budget_mib),
            ("max_body_bytes", self.max_body_bytes),
            ("max_context", self.max_context.unwrap_or(1)),
            ("plugin_memory_mib", self.plugin_memory_mib),
        ];
        if let Some((option, _)) = positive.iter().find(|(_, v)| *v == 0) {
            return Err(ConfigError::Invalid {
                option,
                message: "must be at least 1".into(),
            });
        }
        if self.max_batch_tokens < self.max_running {
            return Err(ConfigError::Invalid {
                option: "max_batch_tokens",
                message: format!(
                    "{} is less than max_running = {}; every running sequence decodes one token \
                     per step",
                    self.max_batch_tokens, self.max_running
                ),
            });
        }
        if self.prefill_chunk > self.max_batch_tokens {
            return Err(ConfigError::Invalid {
                option: "prefill_chunk",
                message: format!(
                    "{} is larger than max_batch_tokens = {}; a chunk must fit in one step",
                    self.prefill_chunk, self.max_batch_tokens
                ),
            });
        }
        if !self.plugin.is_empty() && self.plugin_dir.is_none() {
            return Err(ConfigError::Invalid {
                option: "plugin",
                message: "plug-ins are listed but plugin_dir is not set; their paths must lie \
                          under it"
                    .into(),
            });
        }
        self.plugin_entries()?;
        self.allowed_origins()?;
        Ok(())
    }

    /// The CORS origins, checked.
    pub fn allowed_origins(&self) -> Result<AllowedOrigins, ConfigError> {
        AllowedOrigins::parse(&self.allowed_origins).map_err(|message| ConfigError::Invalid {
            option: "allowed_origins",
            message,
        })
    }

    /// `request_timeout` as a duration; `None` for no limit.
    pub fn request_timeout(&self) -> Option<Duration> {
        (self.request_timeout > 0).then(|| Duration::from_secs(self.request_timeout))
    }

    /// The `plugin` entries, parsed.
    pub fn plugin_entries(&self) -> Result<Vec<PluginEntry>, ConfigError> {
        self.plugin.iter().map(|p| PluginEntry::parse(p)).collect()
    }

    /// The plug-in memory budget in bytes.
    pub fn plugin_budget_bytes(&self) -> usize {
        self.plugin_memory_mib.saturating_mul(1024 * 1024)
    }

    /// The KV cache budget in bytes.
    pub fn kv_budget_bytes(&self) -> usize {
        self.kv_budget_mib.saturating_mul(1024 * 1024)
    }

    /// The name clients use: `model_id`, else the default model's name, else the file (or
    /// folder) name without extension.
    pub fn served_model_id(&self) -> String {
        if let Some(id) = &self.model_id {
            return id.clone();
        }
        match &self.model {
            None => DEFAULT_MODEL_ID.to_string(),
            Some(path) => path
                .file_stem()
                .map(|s| s.to_string_lossy().into_owned())
                .unwrap_or_else(|| path.display().to_string()),
        }
    }

    /// `api_key` plus the keys in `api_key_file` (either format), checked.
    pub fn api_keys(&self) -> Result<KeyTable, ConfigError> {
        let text = self.api_key_file.as_deref().map(read).transpose()?;
        KeyTable::from_sources(&self.api_key, text.as_deref()).map_err(|e| {
            match (&e, &self.api_key_file) {
                (KeyFileError::Line { .. }, Some(path)) => ConfigError::KeyFile {
                    path: path.clone(),
                    source: e,
                },
                _ => ConfigError::Keys(e),
            }
        })
    }

    /// The chat template file's text, if one is configured.
    pub fn chat_template_text(&self) -> Result<Option<String>, ConfigError> {
        self.chat_template.as_deref().map(read).transpose()
    }

    /// The configuration as TOML for `--print-config`, API keys redacted (the output tends
    /// to end up in logs and bug reports).
    pub fn to_toml(&self) -> Result<String, ConfigError> {
        let redacted = Self {
            api_key: self
                .api_key
                .iter()
                .map(|_| "<redacted>".to_string())
                .collect(),
            ..self.clone()
        };
        Ok(toml::to_string(&redacted)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::{CommandFactory, FromArgMatches, Parser};

    #[derive(Debug, Parser)]
    struct Cli {
        #[command(flatten)]
        serve: ServeConfig,
    }

    /// Parses `args` with the environment ignored, so the tests do not depend on GRAFT_*
    /// variables of the machine running them.
    fn parse(args: &[&str]) -> (ServeConfig, ArgMatches) {
        let mut command = Cli::command();
        let ids: Vec<String> = command
            .get_arguments()
            .map(|a| a.get_id().to_string())
            .collect();
        for id in ids {
            command = command.mut_arg(id, |a| a.env(None::<&str>));
        }
        let matches = command
            .try_get_matches_from(std::iter::once("t").chain(args.iter().copied()))
            .expect("arguments parse");
        let cli = Cli::from_arg_matches(&matches).expect("struct from matches");
        (cli.serve, matches)
    }

    #[test]
    fn clap_defaults_equal_the_default_impl() {
        let (cli, _) = parse(&[]);
        assert_eq!(cli, ServeConfig::default());
    }

    #[test]
    fn flags_beat_the_file_and_the_file_beats_defaults() {
        let file: ServeConfig = toml::from_str("port = 9000\nmax_running = 4\nhost = \"0.0.0.0\"")
            .expect("file parses");
        let (cli, matches) = parse(&["--port", "9100", "--api-key", "a", "--api-key", "b"]);
        let config = resolve(&cli, &matches, Some(file)).expect("resolve");
        assert_eq!(config.port, 9100, "flag wins");
        assert_eq!(config.max_running, 4, "file beats default");
        assert_eq!(config.host, "0.0.0.0");
        assert_eq!(config.api_key, ["a", "b"]);
        assert_eq!(config.drain_seconds, defaults::DRAIN_SECONDS);
    }

    #[test]
    fn plugin_entries_are_parsed_with_their_type_once() {
        let e = PluginEntry::parse(" steer : v = vectors/v.gguf").expect("parses");
        assert_eq!(e.kind, plugins::PluginKind::Steer);
        assert_eq!(
            (e.name.as_str(), e.path.as_path()),
            ("v", "vectors/v.gguf".as_ref())
        );
        let e = PluginEntry::parse("lorra:sql=a").unwrap_err().to_string();
        assert!(
            e.starts_with("plugin: `lorra:sql=a`: unknown plug-in type `lorra` (known: lora,"),
            "{e}"
        );
        assert!(PluginEntry::parse("lora:sql").is_err());
    }

    #[test]
    fn unknown_file_keys_are_errors() {
        assert!(toml::from_str::<ServeConfig>("prot = 1").is_err());
    }

    #[test]
    fn served_model_id_follows_the_model() {
        let mut c = ServeConfig::default();
        assert_eq!(c.served_model_id(), DEFAULT_MODEL_ID);
        c.model = Some(PathBuf::from("/m/Qwen2-0.5B.Q8_0.gguf"));
        assert_eq!(c.served_model_id(), "Qwen2-0.5B.Q8_0");
        c.model_id = Some("mine".into());
        assert_eq!(c.served_model_id(), "mine");
    }

    #[test]
    fn api_key_file_lines_are_keys() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("keys");
        std::fs::write(&path, "# team keys\nk1\n\n  k2  \n").expect("write");
        let c = ServeConfig {
            api_key: vec!["k0".into()],
            api_key_file: Some(path),
            ..ServeConfig::default()
        };
        let keys = c.api_keys().expect("keys");
        let names: Vec<&str> = keys.keys().iter().map(|k| k.name.as_str()).collect();
        assert_eq!(names, ["api-key-1", "key-2", "key-4"]);
        assert_eq!(keys.find("k2"), Some(2));
    }

    #[test]
    fn key_file_errors_name_the_file_and_line() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("keys.toml");
        std::fs::write(&path, "[[keys]]\nname = \"a\"\nkey = \"k\"\nrpm = 3\n").expect("write");
        let c = ServeConfig {
            api_key_file: Some(path.clone()),
            ..ServeConfig::default()
        };
        let e = c.api_keys().unwrap_err().to_string();
        let expected = format!(
            "api_key_file {}: line 4: unknown field `rpm`",
            path.display()
        );
        assert!(e.starts_with(&expected), "{e}");
    }

    #[test]
    fn request_timeout_zero_is_none_and_origins_are_checked() {
        let mut c = ServeConfig::default();
        assert_eq!(c.request_timeout(), None);
        c.request_timeout = 30;
        assert_eq!(c.request_timeout(), Some(Duration::from_secs(30)));
        c.allowed_origins = vec!["https://a.example/".into()];
        let e = c.validate().unwrap_err().to_string();
        assert!(e.starts_with("allowed_origins: "), "{e}");
    }

    #[test]
    fn validation_names_the_option() {
        let c = ServeConfig {
            max_running: 0,
            ..ServeConfig::default()
        };
        assert!(c
            .validate()
            .unwrap_err()
            .to_string()
            .starts_with("max_running"));
        let c = ServeConfig {
            prefill_chunk: 1024,
            ..ServeConfig::default()
        };
        assert!(c
            .validate()
            .unwrap_err()
            .to_string()
            .starts_with("prefill_chunk"));
        let c = ServeConfig {
            max_running: 64,
            max_batch_tokens: 32,
            prefill_chunk: 16,
            ..ServeConfig::default()
        };
        assert!(c
            .validate()
            .unwrap_err()
            .to_string()
            .starts_with("max_batch_tokens"));
        assert!(ServeConfig::default().validate().is_ok());
    }

    #[test]
    fn print_config_round_trips_and_redacts_keys() {
        let c = ServeConfig {
            api_key: vec!["secret".into()],
            port: 1234,
            ..ServeConfig::default()
        };
        let text = c.to_toml().expect("toml");
        assert!(!text.contains("secret"));
        let back: ServeConfig = toml::from_str(&text).expect("parses");
        assert_eq!(back.port, 1234);
    }
}

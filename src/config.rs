//! Configuration: defaults embedded in the binary, then a file, then `METRONOME_*` variables.
//!
//! Later layers override single keys of earlier ones, so a file or a variable only names what it
//! changes. Variables use `__` between levels: `METRONOME_DETECTOR__WINDOW__SIZE=60`.

use std::collections::BTreeMap;
use std::path::Path;

use figment::providers::{Env, Format, Toml};
use figment::Figment;
use serde::{Deserialize, Serialize};

use crate::agent::AgentConfig;
use crate::archive::ArchiveConfig;
use crate::http::HttpConfig;
use crate::sink::PostgresConfig;
use crate::stream::config::{normalise_kafka_properties, StreamConfig};
use metronome_core::detect::{DetectorConfig, InvalidConfig};

/// The embedded defaults (`config/default.toml`).
pub const DEFAULT_TOML: &str = include_str!("../config/default.toml");

/// Prefix of configuration environment variables.
pub const ENV_PREFIX: &str = "METRONOME_";

/// The whole configuration. Unknown keys are errors, so a typo cannot silently fall back to a
/// default.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Detection core settings.
    pub detector: DetectorConfig,
    /// The LSTM window scorer.
    pub model: ModelConfig,
    /// The stream processor (`metronome process`).
    #[serde(default)]
    pub stream: StreamConfig,
    /// The HTTP server: metrics, health, the alert API.
    #[serde(default)]
    pub http: HttpConfig,
    /// The PostgreSQL sink and the alert API's database.
    #[serde(default)]
    pub postgres: PostgresConfig,
    /// The capture agent (`metronome agent`).
    #[serde(default)]
    pub agent: AgentConfig,
    /// The nightly archive (`metronome archive`) and the backtest's default location.
    #[serde(default)]
    pub archive: ArchiveConfig,
    /// librdkafka properties for every Kafka client, passed through unchanged
    /// (`bootstrap.servers`, `security.protocol`, `sasl.*`, `ssl.*`, ...). Numbers and
    /// booleans (`session.timeout.ms = 6000`, or the same from the environment) are taken as
    /// their text, as librdkafka wants it.
    #[serde(default, deserialize_with = "client_properties")]
    pub kafka: BTreeMap<String, String>,
}

/// A property value as librdkafka takes it: text, whatever TOML or the environment made of it.
#[derive(Deserialize)]
#[serde(untagged)]
enum PropertyValue {
    Text(String),
    Integer(i64),
    Float(f64),
    Flag(bool),
}

fn client_properties<'de, D: serde::Deserializer<'de>>(d: D) -> Result<BTreeMap<String, String>, D::Error> {
    let raw = BTreeMap::<String, PropertyValue>::deserialize(d)?;
    Ok(raw
        .into_iter()
        .map(|(k, v)| {
            let text = match v {
                PropertyValue::Text(t) => t,
                PropertyValue::Integer(i) => i.to_string(),
                PropertyValue::Float(f) => f.to_string(),
                PropertyValue::Flag(b) => b.to_string(),
            };
            (k, text)
        })
        .collect())
}

/// Which sequence model scores windows beside the timing rules.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelConfig {
    /// `embedded` (the model shipped in the binary), `none` (timing rules only) or the path of
    /// a model manifest (`models/<name>-<version>.json`, its ONNX file beside it).
    pub manifest: String,
    /// How often a running processor checks the manifest file for a new version, seconds.
    pub reload_check_s: u64,
    /// The per-press model beside the window model: `embedded`, `none` or a manifest path
    /// (`models/keystroke-stream-<version>.json`). It runs only with a window model.
    pub press_manifest: String,
}

impl Default for ModelConfig {
    fn default() -> Self {
        // The per-press model is opt-in: even waiting for a window's agreement it flagged one
        // test person of 5,550 more than the window detector (models/EVAL.md).
        Self { manifest: "embedded".to_owned(), reload_check_s: 10, press_manifest: "none".to_owned() }
    }
}

/// Where the sequence model comes from, as [`ModelConfig::manifest`] says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ModelSource {
    /// The shipped model compiled into the binary.
    Embedded,
    /// No model: the timing rules alone.
    None,
    /// A manifest file.
    Manifest(std::path::PathBuf),
}

impl ModelConfig {
    /// The source named by `manifest`.
    pub fn source(&self) -> ModelSource {
        ModelSource::named(&self.manifest)
    }

    /// The source named by `press_manifest`.
    pub fn press_source(&self) -> ModelSource {
        ModelSource::named(&self.press_manifest)
    }
}

impl ModelSource {
    fn named(value: &str) -> Self {
        match value.trim() {
            "embedded" => ModelSource::Embedded,
            "none" | "" => ModelSource::None,
            path => ModelSource::Manifest(path.into()),
        }
    }
}

/// Why the configuration could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file given does not exist.
    #[error("config file {0} not found")]
    Missing(String),
    /// A layer did not parse or did not fit the schema.
    #[error("configuration: {0}")]
    Parse(String),
    /// Values parsed but do not make sense together.
    #[error(transparent)]
    Invalid(#[from] InvalidConfig),
}

/// `METRONOME_*` variables that are not configuration keys.
const NOT_KEYS: &[&str] = &["config", "postgres_url", "fault_archive_abort_after_records", "cache_dir", "postgres_dir"];

/// Values a command line sets, the last and strongest layer, as a figment provider: each
/// command says which of its flags stand for which keys, and the validation that follows checks
/// them like any other layer.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Overrides(serde_json::Map<String, serde_json::Value>);

impl Overrides {
    /// No overrides.
    pub fn new() -> Self {
        Self::default()
    }

    /// `[section] key = value` when `value` is given (a flag that was passed).
    pub fn set(mut self, section: &str, key: &str, value: Option<impl Serialize>) -> Self {
        let Some(value) = value.and_then(|v| serde_json::to_value(v).ok()) else { return self };
        // Kafka properties in the environment's spelling (`bootstrap_servers`), so that the flag
        // replaces the environment's value instead of meeting it in the normalisation.
        let key = if section == "kafka" { key.replace('.', "_") } else { key.to_owned() };
        let table = self.0.entry(section.to_owned()).or_insert_with(|| serde_json::Value::Object(Default::default()));
        if let serde_json::Value::Object(table) = table {
            table.insert(key, value);
        }
        self
    }
}

impl figment::Provider for Overrides {
    fn metadata(&self) -> figment::Metadata {
        figment::Metadata::named("command line")
    }

    fn data(&self) -> Result<figment::value::Map<figment::Profile, figment::value::Dict>, figment::Error> {
        figment::providers::Serialized::defaults(&self.0).data()
    }
}

impl Config {
    /// Loads defaults, then `file` if given, then the process environment.
    pub fn load(file: Option<&Path>) -> Result<Self, ConfigError> {
        Self::load_with(file, Overrides::new())
    }

    /// As [`Config::load`], with a command line's `overrides` over every other layer.
    pub fn load_with(file: Option<&Path>, overrides: Overrides) -> Result<Self, ConfigError> {
        // METRONOME_CONFIG names the file and METRONOME_POSTGRES_URL is `demo --postgres-url`:
        // flags' environment forms, not keys; METRONOME_FAULT_* are the tests' fault hooks;
        // METRONOME_CACHE_DIR and METRONOME_POSTGRES_DIR are the scripts' (scripts/setup).
        Self::from_layers(file, Env::prefixed(ENV_PREFIX).split("__").ignore(NOT_KEYS), overrides)
    }

    /// As [`Config::load`] with an explicit environment provider (tests pass a fixed one).
    pub fn load_with_env(file: Option<&Path>, env: Env) -> Result<Self, ConfigError> {
        Self::from_layers(file, env, Overrides::new())
    }

    fn from_layers(file: Option<&Path>, env: Env, overrides: Overrides) -> Result<Self, ConfigError> {
        let mut figment = Figment::from(Toml::string(DEFAULT_TOML));
        if let Some(path) = file {
            if !path.is_file() {
                return Err(ConfigError::Missing(path.display().to_string()));
            }
            figment = figment.merge(Toml::file(path));
        }
        let mut config: Config =
            figment.merge(env).merge(overrides).extract().map_err(|e| ConfigError::Parse(one_line(&e)))?;
        config.detector.validate()?;
        config.stream.validate().map_err(ConfigError::Parse)?;
        config.postgres.validate().map_err(ConfigError::Parse)?;
        config.http.validate().map_err(ConfigError::Parse)?;
        config.agent.validate().map_err(ConfigError::Parse)?;
        config.archive.validate().map_err(ConfigError::Parse)?;
        config.kafka = normalise_kafka_properties(&config.kafka);
        Ok(config)
    }
}

fn one_line(e: &figment::Error) -> String {
    e.to_string().lines().collect::<Vec<_>>().join("; ")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn no_env() -> Env {
        Env::prefixed("METRONOME_TEST_UNSET_PREFIX_")
    }

    #[test]
    fn embedded_defaults_match_the_code_defaults() {
        let cfg = Config::load_with_env(None, no_env()).unwrap();
        assert_eq!(cfg.detector, DetectorConfig::default());
        assert_eq!(cfg.model, ModelConfig::default());
        assert_eq!(cfg.model.source(), ModelSource::Embedded);
        assert_eq!(cfg.stream, StreamConfig::default());
        assert_eq!(cfg.postgres, PostgresConfig::default());
        assert_eq!(cfg.http, HttpConfig::default());
        assert_eq!(cfg.agent, AgentConfig::default());
        assert_eq!(cfg.archive, ArchiveConfig::default());
        assert_eq!(cfg.kafka.get("bootstrap.servers").map(String::as_str), Some("localhost:9092"));
    }

    #[test]
    #[allow(clippy::result_large_err)] // figment's Jail API returns its own error type
    fn kafka_properties_pass_through_and_take_environment_spelling() {
        figment::Jail::expect_with(|jail| {
            jail.create_file("c.toml", "[kafka]\n\"security.protocol\" = \"SASL_SSL\"\n")?;
            jail.set_env("METRONOME_KAFKA__BOOTSTRAP_SERVERS", "broker:9093");
            jail.set_env("METRONOME_STREAM__INPUT_TOPIC", "other.events");
            jail.set_env("METRONOME_KAFKA__SESSION_TIMEOUT_MS", "6000");
            jail.set_env("METRONOME_KAFKA__ENABLE_IDEMPOTENCE", "true");
            let cfg = Config::load(Some(Path::new("c.toml"))).unwrap();
            assert_eq!(cfg.kafka["bootstrap.servers"], "broker:9093");
            // Numbers and flags from the environment are properties too, as text.
            assert_eq!(cfg.kafka["session.timeout.ms"], "6000");
            assert_eq!(cfg.kafka["enable.idempotence"], "true");
            assert_eq!(cfg.kafka["security.protocol"], "SASL_SSL");
            assert_eq!(cfg.stream.input_topic, "other.events");
            Ok(())
        });
    }

    #[test]
    fn file_overrides_single_keys() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.toml");
        std::fs::write(&path, "[detector.window]\nsize = 60\n").unwrap();
        let cfg = Config::load_with_env(Some(&path), no_env()).unwrap();
        assert_eq!(cfg.detector.window.size, 60);
        assert_eq!(cfg.detector.window.hop, 10);
    }

    #[test]
    #[allow(clippy::result_large_err)] // figment's Jail API returns its own error type
    fn the_command_line_overrides_the_environment_and_is_validated_like_it() {
        figment::Jail::expect_with(|jail| {
            jail.set_env("METRONOME_KAFKA__BOOTSTRAP_SERVERS", "env:9092");
            jail.set_env("METRONOME_STREAM__INSTANCE_ID", "from-env");
            let flags = Overrides::new()
                .set("kafka", "bootstrap.servers", Some("flag:9092"))
                .set("stream", "state_dir", Some(std::path::PathBuf::from("/tmp/s")))
                .set("stream", "instance_id", None::<String>);
            let config = Config::load_with(None, flags).unwrap();
            assert_eq!(config.kafka["bootstrap.servers"], "flag:9092");
            assert_eq!(config.stream.state_dir, std::path::PathBuf::from("/tmp/s"));
            assert_eq!(config.stream.instance_id, "from-env", "a flag not given leaves the layer below");
            let bad = Config::load_with(None, Overrides::new().set("postgres", "url", Some("mysql://x")));
            assert!(matches!(bad, Err(ConfigError::Parse(_))), "{bad:?}");
            Ok(())
        });
    }

    #[test]
    #[allow(clippy::result_large_err)] // figment's Jail API returns its own error type
    fn environment_overrides_the_file() {
        figment::Jail::expect_with(|jail| {
            jail.create_file("c.toml", "[detector.window]\nsize = 60\n")?;
            jail.set_env("METRONOME_DETECTOR__WINDOW__SIZE", "70");
            jail.set_env("METRONOME_CONFIG", "c.toml");
            // The scripts' own variables are not keys (scripts/setup, scripts/postgres).
            jail.set_env("METRONOME_CACHE_DIR", "/var/tmp/cache");
            jail.set_env("METRONOME_POSTGRES_DIR", "/var/tmp/pg");
            let cfg = Config::load(Some(Path::new("c.toml"))).unwrap();
            assert_eq!(cfg.detector.window.size, 70);
            Ok(())
        });
    }

    #[test]
    fn bad_values_are_refused_with_a_reason() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.toml");
        std::fs::write(&path, "[detector.policy]\nconfirm_k = 9\n").unwrap();
        let err = Config::load_with_env(Some(&path), no_env()).unwrap_err().to_string();
        assert!(err.contains("confirm_k"), "{err}");
        std::fs::write(&path, "[detectr]\nsize = 3\n").unwrap();
        let err = Config::load_with_env(Some(&path), no_env()).unwrap_err().to_string();
        assert!(err.contains("detectr"), "{err}");
        std::fs::write(&path, "[detector.window]\nsise = 3\n").unwrap();
        let err = Config::load_with_env(Some(&path), no_env()).unwrap_err().to_string();
        assert!(err.contains("sise"), "{err}");
        assert!(!err.contains('\n'));
        let err = Config::load_with_env(Some(Path::new("/nonexistent.toml")), no_env()).unwrap_err();
        assert!(matches!(err, ConfigError::Missing(_)));
    }
}

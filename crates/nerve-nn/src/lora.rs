//! LoRA (Hu et al. 2021): low-rank adapters on chosen [`Linear`] layers, with PEFT's names,
//! defaults and files, so an adapter trained here loads in PEFT and the other way round.
//!
//! ```
//! use nerve_core::Tensor;
//! use nerve_nn::lora::{self, LoraConfig};
//! use nerve_nn::{Linear, Module, ModuleExt, ReLU, Sequential};
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let model = Sequential::new()
//!     .add(Linear::new(8, 16, true)?)
//!     .add(ReLU)
//!     .add(Linear::new(16, 4, true)?);
//! let config = LoraConfig::new(4, 8.0, &["0"]);
//! let adapted = lora::apply(&model, &config)?;
//! assert_eq!(adapted, ["0"]);
//! // Only the adapter trains: lora_A [4, 8] and lora_B [16, 4].
//! assert_eq!(model.num_trainable_parameters(), 4 * 8 + 16 * 4);
//! let y = model.forward(&Tensor::randn([2, 8]))?;
//! lora::merge(&model)?; // fold B·A into the weight: same outputs, no adapter left
//! # let _ = y;
//! # Ok(())
//! # }
//! ```

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use nerve_core::{Error, Result, Tensor};
use serde::{Deserialize, Serialize};

use crate::checkpoint::{load_safetensors, save_safetensors, write_atomic, CheckpointError};
use crate::init::{self, FanMode};
use crate::layers::{Dropout, LoraAdapter};
use crate::module::{Module, ModuleExt};

/// The prefix PEFT's `save_pretrained` puts before every module name.
pub const PEFT_PREFIX: &str = "base_model.model.";
/// File name of the adapter weights (PEFT's).
pub const ADAPTER_WEIGHTS: &str = "adapter_model.safetensors";
/// File name of the adapter configuration (PEFT's).
pub const ADAPTER_CONFIG: &str = "adapter_config.json";

/// Which modules get adapters: PEFT's `target_modules`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum TargetModules {
    /// Module names: a module matches when its full dotted name equals one, or ends with
    /// `.` + one (`"q_proj"` matches `model.layers.3.self_attn.q_proj`).
    Names(Vec<String>),
    /// A regular expression that must match the whole module name; `"all-linear"` means
    /// every Linear but the output layer (`lm_head`, or a classifier's `classifier` /
    /// `score` head), as in PEFT.
    Pattern(String),
}

/// A LoRA configuration: PEFT's `LoraConfig` fields and defaults (`r` 8, `lora_alpha` 8,
/// `lora_dropout` 0, no bias training, `A` kaiming-uniform and `B` zero).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct LoraConfig {
    /// The rank of the update.
    pub r: usize,
    /// The update is scaled by `lora_alpha / r` (`lora_alpha / sqrt(r)` with `use_rslora`).
    pub lora_alpha: f64,
    /// Dropout on each adapter's input during training.
    #[serde(default)]
    pub lora_dropout: f64,
    /// Which Linear layers get adapters.
    pub target_modules: TargetModules,
    /// Rank-stabilised scaling `alpha / sqrt(r)`.
    #[serde(default)]
    pub use_rslora: bool,
    /// Which biases train: only `"none"` is supported.
    #[serde(default = "default_bias")]
    pub bias: String,
    /// Always `"LORA"`.
    #[serde(default = "default_peft_type")]
    pub peft_type: String,
    /// The task (`"CAUSAL_LM"`, `"SEQ_CLS"`, …), informational.
    #[serde(default)]
    pub task_type: Option<String>,
    /// The base model the adapter was trained on, informational.
    #[serde(default)]
    pub base_model_name_or_path: Option<String>,
    /// Whether weights are stored `[in, out]` (GPT-2's Conv1D): not supported.
    #[serde(default)]
    pub fan_in_fan_out: bool,
    /// Whole modules trained and saved beside the adapters (a classification head).
    #[serde(default)]
    pub modules_to_save: Option<Vec<String>>,
    /// PEFT's per-layer rank overrides: not supported (must be empty).
    #[serde(default)]
    pub rank_pattern: HashMap<String, serde_json::Value>,
    /// PEFT's per-layer alpha overrides: not supported (must be empty).
    #[serde(default)]
    pub alpha_pattern: HashMap<String, serde_json::Value>,
    /// DoRA: not supported.
    #[serde(default)]
    pub use_dora: bool,
}

fn default_bias() -> String {
    "none".into()
}

fn default_peft_type() -> String {
    "LORA".into()
}

impl LoraConfig {
    /// Rank `r`, `lora_alpha` and target module names; everything else PEFT's default.
    pub fn new(r: usize, lora_alpha: f64, target_modules: &[&str]) -> Self {
        Self {
            r,
            lora_alpha,
            lora_dropout: 0.0,
            target_modules: TargetModules::Names(
                target_modules.iter().map(|s| s.to_string()).collect(),
            ),
            use_rslora: false,
            bias: default_bias(),
            peft_type: default_peft_type(),
            task_type: None,
            base_model_name_or_path: None,
            fan_in_fan_out: false,
            modules_to_save: None,
            rank_pattern: HashMap::new(),
            alpha_pattern: HashMap::new(),
            use_dora: false,
        }
    }

    /// The factor applied to `B A x`.
    pub fn scaling(&self) -> f64 {
        if self.use_rslora {
            self.lora_alpha / (self.r as f64).sqrt()
        } else {
            self.lora_alpha / self.r as f64
        }
    }

    /// Refuse what nerve does not implement, naming the field.
    pub fn validate(&self) -> std::result::Result<(), String> {
        let mut bad = Vec::new();
        if self.peft_type != "LORA" {
            bad.push(format!("peft_type {:?} is not LORA", self.peft_type));
        }
        if self.r == 0 {
            bad.push("r must be at least 1".to_string());
        }
        if !(0.0..1.0).contains(&self.lora_dropout) {
            bad.push(format!("lora_dropout {} not in [0, 1)", self.lora_dropout));
        }
        if self.bias != "none" {
            bad.push(format!(
                "bias {:?} is not supported (only \"none\")",
                self.bias
            ));
        }
        if self.fan_in_fan_out {
            bad.push("fan_in_fan_out = true is not supported".into());
        }
        if self.modules_to_save.as_ref().is_some_and(|m| !m.is_empty()) {
            bad.push("modules_to_save is not supported".into());
        }
        if !self.rank_pattern.is_empty() || !self.alpha_pattern.is_empty() {
            bad.push("rank_pattern / alpha_pattern are not supported".into());
        }
        if self.use_dora {
            bad.push("use_dora = true (DoRA) is not supported".into());
        }
        if let TargetModules::Pattern(p) = &self.target_modules {
            if p != "all-linear" {
                if let Err(e) = regex::Regex::new(&format!("^(?:{p})$")) {
                    bad.push(format!(
                        "target_modules is not a valid regular expression: {e}"
                    ));
                }
            }
        }
        if bad.is_empty() {
            Ok(())
        } else {
            Err(bad.join("; "))
        }
    }

    /// Whether the module `name` is a target.
    pub fn targets(&self, name: &str) -> bool {
        match &self.target_modules {
            TargetModules::Names(names) => names.iter().any(|t| {
                name == t
                    || name
                        .strip_suffix(t.as_str())
                        .is_some_and(|head| head.ends_with('.'))
            }),
            TargetModules::Pattern(p) if p == "all-linear" => !matches!(
                name.rsplit('.').next(),
                Some("lm_head" | "classifier" | "score")
            ),
            TargetModules::Pattern(p) => regex::Regex::new(&format!("^(?:{p})$"))
                .map(|re| re.is_match(name))
                .unwrap_or(false),
        }
    }
}

/// Errors of adapter files and targets.
#[derive(Debug, thiserror::Error)]
pub enum LoraError {
    /// The configuration is not usable.
    #[error("{}LoRA config: {msg}", path.as_ref().map(|p| format!("{}: ", p.display())).unwrap_or_default())]
    Config {
        /// The `adapter_config.json`, when it came from one.
        path: Option<PathBuf>,
        /// What is wrong.
        msg: String,
    },
    /// No module of the model matches the targets, or a target is not a Linear.
    #[error("LoRA targets: {0}")]
    Target(String),
    /// The adapter file does not fit the adapted model.
    #[error("{path}: adapter does not fit the model: {msg}")]
    Mismatch {
        /// The adapter weights file.
        path: PathBuf,
        /// Missing, unexpected and mis-shaped names.
        msg: String,
    },
    /// Reading or writing a file failed.
    #[error(transparent)]
    Checkpoint(#[from] CheckpointError),
    /// A tensor operation failed.
    #[error(transparent)]
    Tensor(#[from] Error),
}

fn config_error(path: Option<&Path>, msg: impl Into<String>) -> LoraError {
    LoraError::Config {
        path: path.map(Path::to_path_buf),
        msg: msg.into(),
    }
}

/// Attach fresh adapters (`A` kaiming-uniform with `a = sqrt(5)` like PEFT, `B` zero, so the
/// model's output is unchanged) to every Linear that `config` targets, and freeze every other
/// parameter. Returns the adapted modules' names, in module order.
///
/// Errors if the configuration is unsupported, nothing matches, or a matching module is
/// not a Linear.
pub fn apply(
    model: &dyn Module,
    config: &LoraConfig,
) -> std::result::Result<Vec<String>, LoraError> {
    config.validate().map_err(|m| config_error(None, m))?;
    let all_linear = config.target_modules == TargetModules::Pattern("all-linear".into());
    let mut targets = Vec::new();
    for (name, m) in model.named_modules() {
        if name.is_empty() || !config.targets(&name) {
            continue;
        }
        match m.as_linear() {
            Some(lin) => targets.push((name, lin)),
            None => {
                // A container whose name matches (e.g. a regex over a whole block) is skipped
                // as PEFT does only when it has no parameters of its own.
                if !all_linear && !m.own_parameters().is_empty() {
                    return Err(LoraError::Target(format!(
                        "{name} is a {} and LoRA adapts Linear layers only",
                        m.describe()
                    )));
                }
            }
        }
    }
    if targets.is_empty() {
        return Err(LoraError::Target(format!(
            "target modules {:?} not found in the model",
            config.target_modules
        )));
    }
    model.set_frozen("", true);
    let mut names = Vec::with_capacity(targets.len());
    for (name, lin) in targets {
        let dtype = lin.weight.dtype();
        let a = Tensor::zeros([config.r, lin.in_features()]).to_dtype(dtype)?;
        init::kaiming_uniform_(&a, 5f64.sqrt(), FanMode::FanIn)?;
        let b = Tensor::zeros([lin.out_features(), config.r]).to_dtype(dtype)?;
        lin.set_lora(LoraAdapter {
            a: a.requires_grad_(true),
            b: b.requires_grad_(true),
            scaling: config.scaling(),
            dropout: Dropout::new(config.lora_dropout),
        })?;
        names.push(name);
    }
    Ok(names)
}

/// The adapters' tensors under PEFT's saved names
/// (`base_model.model.<module>.lora_A.weight`, `….lora_B.weight`).
pub fn adapter_state_dict(model: &dyn Module) -> Vec<(String, Tensor)> {
    let mut out = Vec::new();
    for (name, m) in model.named_modules() {
        if let Some(adapter) = m.as_linear().and_then(|l| l.lora()) {
            out.push((
                format!("{PEFT_PREFIX}{name}.lora_A.weight"),
                adapter.a.clone(),
            ));
            out.push((
                format!("{PEFT_PREFIX}{name}.lora_B.weight"),
                adapter.b.clone(),
            ));
        }
    }
    out
}

/// Write the adapters alone, as PEFT's `save_pretrained` does: `dir/adapter_model.safetensors`
/// and `dir/adapter_config.json`, each atomically.
pub fn save(
    model: &dyn Module,
    config: &LoraConfig,
    dir: impl AsRef<Path>,
) -> std::result::Result<(), LoraError> {
    let dir = dir.as_ref();
    let tensors = adapter_state_dict(model);
    if tensors.is_empty() {
        return Err(LoraError::Target(
            "the model has no LoRA adapters to save".into(),
        ));
    }
    let mut meta = HashMap::new();
    meta.insert("format".to_string(), "pt".to_string());
    save_safetensors(dir.join(ADAPTER_WEIGHTS), &tensors, &meta)?;
    let mut json = serde_json::to_value(config).map_err(|e| config_error(None, e.to_string()))?;
    if let Some(obj) = json.as_object_mut() {
        // Fields PEFT writes that nerve has no use for, at PEFT's values.
        obj.insert("inference_mode".into(), true.into());
        obj.insert("init_lora_weights".into(), true.into());
        obj.insert("layers_to_transform".into(), serde_json::Value::Null);
        obj.insert("layers_pattern".into(), serde_json::Value::Null);
    }
    let text =
        serde_json::to_string_pretty(&json).map_err(|e| config_error(None, e.to_string()))?;
    write_atomic(&dir.join(ADAPTER_CONFIG), text.as_bytes())?;
    Ok(())
}

/// Read `dir/adapter_config.json`.
pub fn read_config(dir: impl AsRef<Path>) -> std::result::Result<LoraConfig, LoraError> {
    let path = dir.as_ref().join(ADAPTER_CONFIG);
    let bytes = std::fs::read(&path).map_err(|source| {
        LoraError::Checkpoint(CheckpointError::Io {
            path: path.clone(),
            source,
        })
    })?;
    parse_config(&bytes, &path)
}

/// Parse and [validate](LoraConfig::validate) an `adapter_config.json` held in memory, as
/// [`read_config`] does; `path` names it in errors.
pub fn parse_config(bytes: &[u8], path: &Path) -> std::result::Result<LoraConfig, LoraError> {
    let config: LoraConfig =
        serde_json::from_slice(bytes).map_err(|e| config_error(Some(path), e.to_string()))?;
    config.validate().map_err(|m| config_error(Some(path), m))?;
    Ok(config)
}

/// Load an adapter saved by [`save`] or by PEFT's `save_pretrained` into `model`: attach
/// adapters as its config says, then fill them from the weights file. Every adapter must be
/// in the file and every tensor of the file must belong to one; nothing else is accepted.
pub fn load(
    model: &dyn Module,
    dir: impl AsRef<Path>,
) -> std::result::Result<LoraConfig, LoraError> {
    let dir = dir.as_ref();
    let config = read_config(dir)?;
    let path = dir.join(ADAPTER_WEIGHTS);
    let (tensors, _) = load_safetensors(&path)?;
    apply(model, &config)?;
    // PEFT keeps the adapter name in memory (`lora_A.default.weight`) but not in files;
    // accept both.
    let file: HashMap<String, Tensor> = tensors
        .into_iter()
        .map(|(k, v)| {
            (
                k.replace(".lora_A.default.", ".lora_A.")
                    .replace(".lora_B.default.", ".lora_B."),
                v,
            )
        })
        .collect();
    let own = adapter_state_dict(model);
    let mut missing = Vec::new();
    let mut mismatched = Vec::new();
    for (name, t) in &own {
        match file.get(name) {
            None => missing.push(name.clone()),
            Some(s) if s.dims() != t.dims() => mismatched.push(format!(
                "{name}: the model has {:?}, the file {:?}",
                t.dims(),
                s.dims()
            )),
            Some(_) => {}
        }
    }
    let known: std::collections::HashSet<&str> = own.iter().map(|(n, _)| n.as_str()).collect();
    let mut unexpected: Vec<&String> = file
        .keys()
        .filter(|k| !known.contains(k.as_str()))
        .collect();
    unexpected.sort();
    if !missing.is_empty() || !mismatched.is_empty() || !unexpected.is_empty() {
        for (_, m) in model.named_modules() {
            if let Some(l) = m.as_linear() {
                l.take_lora();
            }
        }
        let mut parts = Vec::new();
        if !missing.is_empty() {
            parts.push(format!("missing {}", missing.join(", ")));
        }
        if !unexpected.is_empty() {
            let u: Vec<&str> = unexpected.iter().map(|s| s.as_str()).collect();
            parts.push(format!("unexpected {}", u.join(", ")));
        }
        parts.extend(mismatched);
        return Err(LoraError::Mismatch {
            path,
            msg: parts.join("; "),
        });
    }
    for (name, t) in &own {
        t.copy_(&file[name])?;
    }
    Ok(config)
}

/// Fold every adapter into its layer's weight (`W += scaling · B A`) and detach it: the
/// model computes the same function with no extra cost. Returns how many were merged.
pub fn merge(model: &dyn Module) -> Result<usize> {
    let mut n = 0;
    for (_, m) in model.named_modules() {
        if let Some(l) = m.as_linear() {
            n += usize::from(l.merge_lora()?);
        }
    }
    Ok(n)
}

/// Detach every adapter without merging (PEFT's `unload`); returns how many.
pub fn unload(model: &dyn Module) -> usize {
    model
        .named_modules()
        .into_iter()
        .filter_map(|(_, m)| m.as_linear().and_then(|l| l.take_lora()))
        .count()
}

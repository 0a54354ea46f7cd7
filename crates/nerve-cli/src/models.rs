//! The networks `nerve train` builds: classifiers named like their PyTorch twins, and the
//! language models of the zoo. Each zoo model has a serde config; `--config FILE.json`
//! overrides its fields, and the effective config is stored with the checkpoint.

use anyhow::{bail, Context, Result};
use clap::ValueEnum;
use nerve_models::{
    CharRnn, CharRnnCell, CharRnnConfig, Gpt, GptConfig, LanguageModel, MambaConfig, MambaLm, Vit,
    VitConfig,
};
use nerve_nn::Module;
use serde::{de::DeserializeOwned, Serialize};
use serde_json::{Map, Value};

/// Which network to train.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum ModelKind {
    /// Flatten → 512 → ReLU → 512 → ReLU → classes.
    Mlp,
    /// The `cnn` workload: conv 32 3×3, ReLU, pool 2; conv 64 3×3, ReLU, pool 2; 128, ReLU,
    /// classes (images only).
    Cnn,
    /// Vision Transformer classifier (patch 4, width 128, 4 layers, 4 heads; square images).
    Vit,
    /// Character-level LSTM language model (embedding 64, hidden 256).
    Lstm,
    /// Character-level GRU language model (embedding 64, hidden 256).
    Gru,
    /// Decoder-only Transformer language model (the `gpt` workload's shape).
    Gpt,
    /// Mamba language model (the `mamba` workload's shape: width 128, 4 layers, state 16).
    Mamba,
    /// Class-conditional diffusion model (U-Net, DDPM) for 28×28 images.
    Ddpm,
}

impl ModelKind {
    /// The name stored in checkpoints.
    pub fn name(self) -> &'static str {
        match self {
            ModelKind::Mlp => "mlp",
            ModelKind::Cnn => "cnn",
            ModelKind::Vit => "vit",
            ModelKind::Lstm => "lstm",
            ModelKind::Gru => "gru",
            ModelKind::Gpt => "gpt",
            ModelKind::Mamba => "mamba",
            ModelKind::Ddpm => "ddpm",
        }
    }

    /// Parse a name stored in a checkpoint.
    pub fn from_name(s: &str) -> Option<Self> {
        ModelKind::value_variants()
            .iter()
            .copied()
            .find(|k| k.name() == s)
    }

    /// Whether this is a language model (trained on text, by steps).
    pub fn is_lm(self) -> bool {
        matches!(
            self,
            ModelKind::Lstm | ModelKind::Gru | ModelKind::Gpt | ModelKind::Mamba
        )
    }
}

/// The config `T`: its defaults, overridden by the fields of `user` (a JSON object), with the
/// `forced` fields (sizes that the data decides) set — a user value that disagrees with one
/// of those is refused, naming the field. Returns the config and its JSON.
pub fn config_from<T: Serialize + DeserializeOwned + Default>(
    what: &str,
    user: Option<&Value>,
    forced: &[(&str, Value)],
) -> Result<(T, Value)> {
    let mut v = serde_json::to_value(T::default())?;
    let obj: &mut Map<String, Value> = v.as_object_mut().expect("configs are structs");
    if let Some(u) = user {
        let Some(u) = u.as_object() else {
            bail!("{what} config: expected a JSON object, got {u}");
        };
        for k in u.keys() {
            if !obj.contains_key(k) {
                let mut known: Vec<&str> = obj.keys().map(String::as_str).collect();
                known.sort_unstable();
                bail!(
                    "{what} config: unknown field `{k}`, expected one of {}",
                    known.join(", ")
                );
            }
        }
        for (k, val) in u {
            obj.insert(k.clone(), val.clone());
        }
    }
    for (k, val) in forced {
        if let Some(given) = user.and_then(|u| u.get(*k)) {
            if given != val {
                bail!("{what} config: `{k}` is {given} but the data needs {val}");
            }
        }
        obj.insert(k.to_string(), val.clone());
    }
    let c: T = serde_json::from_value(v).with_context(|| format!("{what} config"))?;
    let json = serde_json::to_value(&c)?;
    Ok((c, json))
}

/// Build classifier `kind` for samples shaped `sample_dims` and `classes` outputs; returns
/// it with its config JSON (`null` for the fixed `mlp` and `cnn`).
pub fn build(
    kind: ModelKind,
    sample_dims: &[usize],
    classes: usize,
    config: Option<&Value>,
) -> Result<(Box<dyn Module>, Value)> {
    if !matches!(kind, ModelKind::Vit) && config.is_some_and(|c| !c.is_null()) {
        bail!("--model {} takes no --config", kind.name());
    }
    let image = |what: &str| -> Result<()> {
        if sample_dims.len() != 3 {
            bail!(
                "--model {what} needs image samples [channels, height, width]; this data set has samples shaped {sample_dims:?} (use --model mlp)"
            );
        }
        Ok(())
    };
    Ok(match kind {
        ModelKind::Mlp => (
            Box::new(nerve_models::mlp(
                sample_dims.iter().product(),
                &[512, 512],
                classes,
            )?),
            Value::Null,
        ),
        ModelKind::Cnn => {
            image("cnn")?;
            (
                Box::new(
                    nerve_models::cnn(sample_dims, classes)
                        .map_err(|e| anyhow::anyhow!("--model cnn: {e}"))?,
                ),
                Value::Null,
            )
        }
        ModelKind::Vit => {
            image("vit")?;
            if sample_dims[1] != sample_dims[2] {
                bail!("--model vit needs square images; these are {sample_dims:?}");
            }
            let (c, json): (VitConfig, _) = config_from(
                "vit",
                config,
                &[
                    ("channels", sample_dims[0].into()),
                    ("image", sample_dims[1].into()),
                    ("classes", classes.into()),
                ],
            )?;
            (Box::new(Vit::new(c)?), json)
        }
        other => bail!("--model {} is not a classifier", other.name()),
    })
}

/// Build language model `kind` over `vocab` tokens; returns it with its config JSON.
pub fn build_lm(
    kind: ModelKind,
    vocab: usize,
    config: Option<&Value>,
) -> Result<(Box<dyn LanguageModel>, Value)> {
    let forced = [("vocab_size", Value::from(vocab))];
    Ok(match kind {
        ModelKind::Lstm | ModelKind::Gru => {
            let cell = if kind == ModelKind::Lstm {
                CharRnnCell::Lstm
            } else {
                CharRnnCell::Gru
            };
            let mut f = forced.to_vec();
            f.push(("cell", serde_json::to_value(cell)?));
            let (c, json): (CharRnnConfig, _) = config_from(kind.name(), config, &f)?;
            (Box::new(CharRnn::new(c)?), json)
        }
        ModelKind::Gpt => {
            let (c, json): (GptConfig, _) = config_from("gpt", config, &forced)?;
            (Box::new(Gpt::new(c)?), json)
        }
        ModelKind::Mamba => {
            let (c, json): (MambaConfig, _) = config_from("mamba", config, &forced)?;
            (Box::new(MambaLm::new(c)?), json)
        }
        other => bail!("--model {} is not a language model", other.name()),
    })
}

/// The longest sequence `kind` with `config` accepts, if it has a limit.
pub fn context_of(config: &Value) -> Option<usize> {
    config
        .get("context")
        .and_then(Value::as_u64)
        .map(|c| c as usize)
}

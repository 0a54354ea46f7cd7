//! # nerve-models
//!
//! The model zoo, one file per architecture, each built from nerve-nn layers with the same
//! structure (and so the same `state_dict` names) as its PyTorch twin.
#![warn(missing_docs)]

pub mod bert;
pub mod char_rnn;
pub mod cnn;
pub mod ddpm;
pub mod efficientnet;
pub mod gguf;
pub mod gpt;
pub mod llama;
pub mod lm;
pub mod mamba;
pub mod mlp;
pub mod qllama;
pub mod unet;
pub mod vit;

pub use bert::{load_sentence_encoder, Bert, BertClassifier, BertConfig};
pub use char_rnn::{CharRnn, CharRnnCell, CharRnnConfig};
pub use cnn::cnn;
pub use efficientnet::{EfficientNet, EfficientNetConfig};
pub use gpt::{Gpt, GptConfig};
pub use llama::{Llama, LlamaCache, LlamaConfig};
pub use lm::{causal_lm_loss, LanguageModel, Sampler, SamplingOptions};
pub use mamba::{MambaConfig, MambaLm, MixerModel};
pub use mlp::mlp;
pub use qllama::{QuantLlama, QuantLlamaCache};
pub use unet::{UNet, UNetConfig};
pub use vit::{Vit, VitConfig};

/// A lower bound on a model's parameter count: the sum of the products of `terms` (each a
/// list of sizes), or `None` when it overflows.
pub(crate) fn parameters_at_least(terms: &[&[usize]]) -> Option<u128> {
    terms.iter().try_fold(0u128, |sum, t| {
        let p = t.iter().try_fold(1u128, |p, &x| p.checked_mul(x as u128))?;
        sum.checked_add(p)
    })
}

/// This machine's memory and swap in bytes (Linux; `None` elsewhere).
fn memory_bytes() -> Option<u128> {
    let info = std::fs::read_to_string("/proc/meminfo").ok()?;
    let kb = |key: &str| -> Option<u128> {
        let line = info.lines().find(|l| l.starts_with(key))?;
        line.split_whitespace().nth(1)?.parse().ok()
    };
    Some((kb("MemTotal:")? + kb("SwapTotal:").unwrap_or(0)) * 1024)
}

/// Refuse a config whose parameters alone (at least `params`, from
/// [`parameters_at_least`]) would not fit in this machine's memory as f32, naming the
/// `fields` that set the size — before any of it is allocated.
pub(crate) fn check_size(
    what: &'static str,
    params: Option<u128>,
    fields: &str,
) -> nerve_core::Result<()> {
    let limit = memory_bytes().unwrap_or(1 << 50);
    match params {
        Some(p) if p.saturating_mul(4) <= limit => Ok(()),
        Some(p) => Err(nerve_core::Error::invalid(
            what,
            format!(
                "{fields} give at least {p} parameters ({:.1} GiB as f32), more than this \
                 machine's {:.1} GiB of memory",
                p as f64 * 4.0 / (1u64 << 30) as f64,
                limit as f64 / (1u64 << 30) as f64
            ),
        )),
        None => Err(nerve_core::Error::invalid(
            what,
            format!("{fields} give a parameter count that overflows"),
        )),
    }
}

#[cfg(test)]
mod size_tests {
    use super::*;

    #[test]
    fn huge_configs_are_refused_before_allocating() {
        let gpt = GptConfig {
            width: 1 << 20,
            heads: 1,
            ..GptConfig::default()
        };
        let e = Gpt::new(gpt).err().expect("refused").to_string();
        assert!(e.contains("GptConfig") && e.contains("width"), "{e}");
        let e = Gpt::new(GptConfig {
            layers: usize::MAX,
            ..GptConfig::default()
        })
        .err()
        .expect("refused")
        .to_string();
        assert!(e.contains("layers") && e.contains("memory"), "{e}");
        let e = Vit::new(VitConfig {
            layers: usize::MAX,
            width: usize::MAX / 4,
            heads: 1,
            ..VitConfig::default()
        })
        .err()
        .expect("refused")
        .to_string();
        assert!(e.contains("overflows"), "{e}");
        let rnn = CharRnnConfig {
            hidden: 1 << 22,
            ..CharRnnConfig::default()
        };
        assert!(CharRnn::new(rnn).is_err());
        let vit = VitConfig {
            layers: 1 << 30,
            ..VitConfig::default()
        };
        assert!(Vit::new(vit).is_err());
        let mamba = MambaConfig {
            d_model: 1 << 24,
            ..MambaConfig::default()
        };
        assert!(MambaLm::new(mamba).is_err());
        let unet = UNetConfig {
            base_channels: 1 << 24,
            norm_groups: 1,
            attention: false,
            ..UNetConfig::default()
        };
        assert!(UNet::new(unet).is_err());
        let e = mlp(784, &[512], 1 << 40)
            .err()
            .expect("refused")
            .to_string();
        assert!(e.contains("classes"), "{e}");
        // Sizes that fit are built.
        assert!(Gpt::new(GptConfig::default()).is_ok());
    }
}

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

//! A character-level recurrent language model: embedding → LSTM or GRU → linear head
//! (Karpathy's char-rnn; the `lstm` benchmark workload's model by default).

use nerve_core::{Error, Result, Tensor};
use nerve_nn::{Embedding, Linear, Module, Rnn, RnnKind, RnnOptions, RnnState};
use serde::{Deserialize, Serialize};

use crate::lm::{check_prompt, last_logits, pick, LanguageModel};

/// The recurrence of a [`CharRnn`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum CharRnnCell {
    /// `nn.LSTM`.
    Lstm,
    /// `nn.GRU`.
    Gru,
}

/// Sizes of a [`CharRnn`]. The default is the `lstm` workload's model.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct CharRnnConfig {
    /// LSTM or GRU.
    pub cell: CharRnnCell,
    /// Tokens in the vocabulary.
    pub vocab_size: usize,
    /// Embedding width.
    pub embedding: usize,
    /// Hidden units per layer.
    pub hidden: usize,
    /// Stacked recurrent layers.
    pub layers: usize,
    /// Dropout between recurrent layers (training only).
    pub dropout: f64,
}

impl Default for CharRnnConfig {
    fn default() -> Self {
        Self {
            cell: CharRnnCell::Lstm,
            vocab_size: 65,
            embedding: 64,
            hidden: 256,
            layers: 1,
            dropout: 0.0,
        }
    }
}

/// The model. Parameters: `embedding.weight`, `rnn.weight_ih_l0`, … (PyTorch's names),
/// `head.weight`, `head.bias`.
pub struct CharRnn {
    /// Token embedding.
    pub embedding: Embedding,
    /// The recurrent layers (batch first).
    pub rnn: Rnn,
    /// Hidden state → logits.
    pub head: Linear,
    config: CharRnnConfig,
}

impl CharRnn {
    /// A model with PyTorch's default initialisation. Zero sizes or a dropout outside
    /// `[0, 1)` are refused, naming the fields.
    pub fn new(c: CharRnnConfig) -> Result<Self> {
        if c.vocab_size == 0 || c.embedding == 0 || c.hidden == 0 || c.layers == 0 {
            return Err(Error::invalid(
                "CharRnnConfig",
                format!(
                    "vocab_size ({}), embedding ({}), hidden ({}) and layers ({}) must be at least 1",
                    c.vocab_size, c.embedding, c.hidden, c.layers
                ),
            ));
        }
        if !(0.0..1.0).contains(&c.dropout) {
            return Err(Error::invalid(
                "CharRnnConfig",
                format!("dropout ({}) must be in [0, 1)", c.dropout),
            ));
        }
        let gates = match c.cell {
            CharRnnCell::Lstm => 4,
            CharRnnCell::Gru => 3,
        };
        let params = crate::parameters_at_least(&[
            &[c.vocab_size, c.embedding],
            &[gates, c.hidden, c.embedding],
            &[c.layers, gates, c.hidden, c.hidden],
            &[c.hidden, c.vocab_size],
        ]);
        crate::check_size(
            "CharRnnConfig",
            params,
            "vocab_size, embedding, hidden and layers",
        )?;
        let kind = match c.cell {
            CharRnnCell::Lstm => RnnKind::Lstm,
            CharRnnCell::Gru => RnnKind::Gru,
        };
        let opts = RnnOptions {
            num_layers: c.layers,
            batch_first: true,
            dropout: c.dropout,
            ..RnnOptions::default()
        };
        Ok(Self {
            embedding: Embedding::new(c.vocab_size, c.embedding)?,
            rnn: Rnn::new(kind, c.embedding, c.hidden, opts)?,
            head: Linear::new(c.hidden, c.vocab_size, true)?,
            config: c,
        })
    }

    /// The configuration.
    pub fn config(&self) -> CharRnnConfig {
        self.config
    }

    /// Logits `[B, T, vocab]` of `ids` `[B, T]` continuing from `state` (zeros when `None`),
    /// and the state after the last token.
    pub fn forward_with_state(
        &self,
        ids: &Tensor,
        state: Option<&RnnState>,
    ) -> Result<(Tensor, RnnState)> {
        if ids.rank() != 2 {
            return Err(Error::bad_shape(
                "CharRnn",
                ids.dims(),
                "expected token ids [batch, seq]",
            ));
        }
        let (h, s) = self
            .rnn
            .forward_with_state(&self.embedding.forward(ids)?, state)?;
        Ok((self.head.forward(&h)?, s))
    }
}

impl LanguageModel for CharRnn {
    fn vocab_size(&self) -> usize {
        self.config.vocab_size
    }

    /// The recurrent state is the cache: each new token costs one step.
    fn generate_with(
        &self,
        prompt: &[i64],
        n: usize,
        temperature: f64,
        top_k: usize,
        on_token: &mut dyn FnMut(i64) -> Result<()>,
    ) -> Result<Vec<i64>> {
        check_prompt(prompt, self.config.vocab_size)?;
        nerve_core::no_grad(|| {
            let mut out = prompt.to_vec();
            let mut next_in = Tensor::from_vec(prompt.to_vec(), [1, prompt.len()])?;
            let mut state = None;
            for _ in 0..n {
                let (logits, s) = self.forward_with_state(&next_in, state.as_ref())?;
                state = Some(s);
                let tok = pick(&last_logits(&logits)?, temperature, top_k);
                out.push(tok);
                on_token(tok)?;
                next_in = Tensor::from_vec(vec![tok], [1, 1])?;
            }
            Ok(out)
        })
    }
}

impl Module for CharRnn {
    /// Token ids `[batch, seq]` (i64) → logits `[batch, seq, vocab]`, from a zero state.
    fn forward(&self, ids: &Tensor) -> Result<Tensor> {
        Ok(self.forward_with_state(ids, None)?.0)
    }
    fn children(&self) -> Vec<(String, &dyn Module)> {
        vec![
            ("embedding".into(), &self.embedding),
            ("rnn".into(), &self.rnn),
            ("head".into(), &self.head),
        ]
    }
    fn describe(&self) -> String {
        format!("CharRnn({:?})", self.config)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use nerve_nn::ModuleExt;

    #[test]
    fn names_and_incremental_generation() {
        for cell in [CharRnnCell::Lstm, CharRnnCell::Gru] {
            nerve_core::manual_seed(1);
            let m = CharRnn::new(CharRnnConfig {
                cell,
                vocab_size: 11,
                embedding: 6,
                hidden: 8,
                layers: 2,
                dropout: 0.0,
            })
            .unwrap();
            let names: Vec<String> = m.named_parameters().into_iter().map(|(n, _)| n).collect();
            assert!(names.contains(&"rnn.weight_hh_l1".to_string()), "{names:?}");
            assert!(names.contains(&"embedding.weight".to_string()));
            // Greedy generation step by step equals the argmax of a full forward pass over
            // the generated text.
            let out = m.generate(&[1, 2, 3], 6, 0.0, 0).unwrap();
            let full = nerve_core::no_grad(|| {
                m.forward(&Tensor::from_vec(out.clone(), [1, out.len()]).unwrap())
            })
            .unwrap();
            let v = full.to_f64_vec();
            for t in 2..out.len() - 1 {
                let row = &v[t * 11..(t + 1) * 11];
                let best = (0..11).max_by(|&a, &b| row[a].total_cmp(&row[b])).unwrap();
                assert_eq!(best as i64, out[t + 1], "{cell:?} step {t}");
            }
        }
    }

    #[test]
    fn bad_configs_name_fields() {
        let e = CharRnn::new(CharRnnConfig {
            hidden: 0,
            ..Default::default()
        })
        .err()
        .unwrap()
        .to_string();
        assert!(e.contains("hidden (0)"), "{e}");
        assert!(CharRnn::new(CharRnnConfig::default())
            .unwrap()
            .generate(&[], 3, 0.0, 0)
            .is_err());
    }
}

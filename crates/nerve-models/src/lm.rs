//! What the language models of the zoo share: the [`LanguageModel`] trait and sampling.

use nerve_core::{Error, Result, Tensor};
use nerve_nn::Module;

/// A model of token sequences: a [`Module`] mapping ids `[batch, seq]` to next-token logits
/// `[batch, seq, vocab]`, that can also continue a prompt token by token with its own
/// incremental state (a key/value cache, a recurrent state).
pub trait LanguageModel: Module {
    /// Tokens in the vocabulary.
    fn vocab_size(&self) -> usize;

    /// Continue `prompt` (token ids) by `n` tokens: greedy when `temperature` is 0, else
    /// sampling from the `top_k` most likely tokens (all when 0) at that temperature, from
    /// nerve's seeded global generator. Returns the prompt followed by the new tokens.
    fn generate(
        &self,
        prompt: &[i64],
        n: usize,
        temperature: f64,
        top_k: usize,
    ) -> Result<Vec<i64>> {
        self.generate_with(prompt, n, temperature, top_k, &mut |_| Ok(()))
    }

    /// [`generate`](Self::generate), calling `on_token` with each new token as it is drawn
    /// (to stream the text or show progress); an error from it stops generation.
    fn generate_with(
        &self,
        prompt: &[i64],
        n: usize,
        temperature: f64,
        top_k: usize,
        on_token: &mut dyn FnMut(i64) -> Result<()>,
    ) -> Result<Vec<i64>>;
}

/// The causal language-modelling loss: mean cross-entropy of the logits `[batch, seq, vocab]`
/// at each position against the next token of `ids` `[batch, seq]` (the last position has
/// none), as transformers computes it with `labels = input_ids`. Ids equal to −100 are
/// ignored (padding).
pub fn causal_lm_loss(logits: &Tensor, ids: &Tensor) -> Result<Tensor> {
    let (ld, id) = (logits.dims(), ids.dims());
    if ld.len() != 3 || id.len() != 2 || ld[..2] != id[..] {
        return Err(Error::shape_mismatch("causal_lm_loss", ld, id));
    }
    let (b, t, v) = (ld[0], ld[1], ld[2]);
    let ids = ids.to_vec::<i64>()?;
    let mut targets = vec![-100i64; b * t];
    for row in 0..b {
        targets[row * t..row * t + t - 1].copy_from_slice(&ids[row * t + 1..row * t + t]);
    }
    let targets = Tensor::from_vec(targets, [b * t])?;
    // Shifting the targets instead of the logits keeps the logits a view (no copy of the
    // largest tensor of the step).
    nerve_nn::loss::cross_entropy(
        &logits.reshape(&[(b * t) as isize, v as isize])?,
        &targets,
        &Default::default(),
    )
}

/// Refuse an empty prompt or ids outside `0..vocab` (the check every `generate` starts with).
pub fn check_prompt(prompt: &[i64], vocab: usize) -> Result<()> {
    if prompt.is_empty() {
        return Err(Error::invalid("generate", "the prompt is empty"));
    }
    if let Some(&bad) = prompt.iter().find(|&&t| t < 0 || t as usize >= vocab) {
        return Err(Error::invalid(
            "generate",
            format!("token {bad} outside the vocabulary of {vocab}"),
        ));
    }
    Ok(())
}

/// The cached decoding loop of the Llama models: checks the prompt against `vocab` and the
/// `room` positions, then hands `step` the prompt and, after it, each chosen token alone;
/// `step` returns the last position's logits. `choose` picks the next token from those and
/// the tokens so far, `on_token` sees it at once, and the loop stops after `n` tokens or a
/// token in `stop`. Returns the new tokens.
pub(crate) fn decode_with_cache(
    prompt: &[i64],
    n: usize,
    stop: &[i64],
    (vocab, room): (usize, usize),
    mut step: impl FnMut(&[i64]) -> Result<Vec<f32>>,
    mut choose: impl FnMut(&[f32], &[i64]) -> i64,
    mut on_token: impl FnMut(i64) -> Result<()>,
) -> Result<Vec<i64>> {
    check_prompt(prompt, vocab)?;
    if prompt.len() + n > room {
        return Err(Error::invalid(
            "generate",
            format!(
                "the prompt ({} tokens) and {n} new tokens exceed max_position_embeddings \
                 ({room})",
                prompt.len()
            ),
        ));
    }
    let mut out = Vec::new();
    if n == 0 {
        return Ok(out);
    }
    let mut seen = prompt.to_vec();
    let mut last = step(prompt)?;
    for i in 0..n {
        let tok = choose(&last, &seen);
        out.push(tok);
        seen.push(tok);
        on_token(tok)?;
        if stop.contains(&tok) || i + 1 == n {
            break;
        }
        last = step(&[tok])?;
    }
    Ok(out)
}

/// The logits of the last position of `logits` `[1, T, V]` (or `[1, V]`), as f64.
pub fn last_logits(logits: &Tensor) -> Result<Vec<f64>> {
    let row = if logits.rank() == 3 {
        logits.select(1, logits.dims()[1] - 1)?
    } else {
        logits.clone()
    };
    Ok(row.reshape(&[-1])?.to_f64_vec())
}

/// Pick the next token from one row of logits: greedy when `temperature` ≤ 0, else sampled
/// from the `top_k` largest (all when 0) after dividing by `temperature`, with nerve's seeded
/// global generator.
pub fn pick(logits: &[f64], temperature: f64, top_k: usize) -> i64 {
    let mut idx: Vec<usize> = (0..logits.len()).collect();
    idx.sort_by(|&a, &b| logits[b].total_cmp(&logits[a]));
    if temperature <= 0.0 {
        return idx[0] as i64;
    }
    let k = if top_k == 0 {
        idx.len()
    } else {
        top_k.min(idx.len())
    };
    let m = logits[idx[0]];
    let w: Vec<f64> = idx[..k]
        .iter()
        .map(|&i| ((logits[i] - m) / temperature).exp())
        .collect();
    let total: f64 = w.iter().sum();
    let mut u = nerve_core::random::with_global(|g| g.next_f64()) * total;
    for (j, wj) in w.iter().enumerate() {
        u -= wj;
        if u <= 0.0 {
            return idx[j] as i64;
        }
    }
    idx[k - 1] as i64
}

/// How [`Sampler`] picks the next token, with transformers' `generate` options and order:
/// repetition penalty, then temperature, top-k and top-p. Greedy when `temperature` is 0.
#[derive(Clone, Debug, PartialEq)]
pub struct SamplingOptions {
    /// Softmax temperature; 0 means greedy (the most likely token).
    pub temperature: f64,
    /// Keep only the `top_k` most likely tokens (0: all).
    pub top_k: usize,
    /// Keep the smallest set of most likely tokens whose probability reaches `top_p` (1: all).
    pub top_p: f64,
    /// Divide the positive logits (multiply the negative ones) of tokens already seen by this
    /// (1: off), as transformers' `repetition_penalty`.
    pub repetition_penalty: f64,
    /// Seed of the sampler's own generator.
    pub seed: u64,
}

impl Default for SamplingOptions {
    /// Greedy decoding.
    fn default() -> Self {
        Self {
            temperature: 0.0,
            top_k: 0,
            top_p: 1.0,
            repetition_penalty: 1.0,
            seed: 0,
        }
    }
}

impl SamplingOptions {
    /// Refuse values outside their ranges, naming the option.
    pub fn validate(&self) -> Result<()> {
        let bad = |m: &str| Err(Error::invalid("sampling", m.to_string()));
        if !(self.temperature >= 0.0 && self.temperature.is_finite()) {
            return bad("temperature must be a finite number >= 0");
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            return bad("top_p must be in (0, 1]");
        }
        if !(self.repetition_penalty > 0.0 && self.repetition_penalty.is_finite()) {
            return bad("repetition_penalty must be a finite number > 0");
        }
        Ok(())
    }
}

/// Picks next tokens from logits by [`SamplingOptions`], with its own seeded generator (the
/// same seed gives the same text).
pub struct Sampler {
    opts: SamplingOptions,
    rng: nerve_core::random::Generator,
}

impl Sampler {
    /// A sampler; fails on out-of-range options.
    pub fn new(opts: SamplingOptions) -> Result<Self> {
        opts.validate()?;
        let rng = nerve_core::random::Generator::new(opts.seed);
        Ok(Self { opts, rng })
    }

    /// The next token from one row of logits, given the tokens so far (prompt included).
    pub fn pick(&mut self, logits: &[f32], seen: &[i64]) -> i64 {
        let o = &self.opts;
        let mut l: Vec<f64> = logits.iter().map(|&v| v as f64).collect();
        if o.repetition_penalty != 1.0 {
            let mut done = std::collections::HashSet::new();
            for &t in seen {
                if t >= 0 && (t as usize) < l.len() && done.insert(t) {
                    let v = &mut l[t as usize];
                    *v = if *v < 0.0 {
                        *v * o.repetition_penalty
                    } else {
                        *v / o.repetition_penalty
                    };
                }
            }
        }
        let best = (0..l.len())
            .max_by(|&a, &b| l[a].total_cmp(&l[b]))
            .unwrap_or(0);
        if o.temperature <= 0.0 {
            return best as i64;
        }
        let mut idx: Vec<usize> = (0..l.len()).collect();
        idx.sort_by(|&a, &b| l[b].total_cmp(&l[a]));
        if o.top_k > 0 {
            idx.truncate(o.top_k);
        }
        let m = l[idx[0]];
        let mut w: Vec<f64> = idx
            .iter()
            .map(|&i| ((l[i] - m) / o.temperature).exp())
            .collect();
        if o.top_p < 1.0 {
            // Keep tokens while the probability before them is below top_p (at least one).
            let total: f64 = w.iter().sum();
            let mut before = 0.0;
            let keep = w
                .iter()
                .take_while(|&&p| {
                    let k = before / total < o.top_p;
                    before += p;
                    k
                })
                .count()
                .max(1);
            w.truncate(keep);
        }
        let total: f64 = w.iter().sum();
        let mut u = self.rng.next_f64() * total;
        for (j, wj) in w.iter().enumerate() {
            u -= wj;
            if u <= 0.0 {
                return idx[j] as i64;
            }
        }
        idx[w.len() - 1] as i64
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn greedy_and_top_k() {
        let l = [0.1, 3.0, -1.0, 2.0];
        assert_eq!(pick(&l, 0.0, 0), 1);
        nerve_core::manual_seed(3);
        for _ in 0..200 {
            let t = pick(&l, 1.0, 2);
            assert!(t == 1 || t == 3, "top-2 sampled {t}");
        }
        // A very low temperature is nearly greedy; a high one reaches every token.
        let mut seen = [false; 4];
        for _ in 0..2000 {
            seen[pick(&l, 100.0, 0) as usize] = true;
        }
        assert!(seen.iter().all(|&s| s));
    }

    #[test]
    fn prompt_checks() {
        assert!(check_prompt(&[], 5).is_err());
        assert!(check_prompt(&[0, 5], 5).is_err());
        assert!(check_prompt(&[-1], 5).is_err());
        assert!(check_prompt(&[0, 4], 5).is_ok());
    }

    #[test]
    fn sampler_options() {
        let l = [0.1f32, 3.0, -1.0, 2.0, 2.9];
        let mut greedy = Sampler::new(SamplingOptions::default()).unwrap();
        assert_eq!(greedy.pick(&l, &[]), 1);
        // The penalty turns greedy away from a token already seen (3.0 / 2 < 2.9).
        let mut pen = Sampler::new(SamplingOptions {
            repetition_penalty: 2.0,
            ..Default::default()
        })
        .unwrap();
        assert_eq!(pen.pick(&l, &[1]), 4);
        // top-p 0.5 at temperature 1 keeps only tokens 1 and 4 (p ≈ 0.44, 0.40).
        let mut top_p = Sampler::new(SamplingOptions {
            temperature: 1.0,
            top_p: 0.5,
            seed: 7,
            ..Default::default()
        })
        .unwrap();
        let mut seen = [0usize; 5];
        for _ in 0..500 {
            seen[top_p.pick(&l, &[]) as usize] += 1;
        }
        assert_eq!(seen[0] + seen[2] + seen[3], 0, "{seen:?}");
        assert!(seen[1] > 100 && seen[4] > 100, "{seen:?}");
        // Same seed, same draws.
        let draw = |seed| {
            let mut s = Sampler::new(SamplingOptions {
                temperature: 1.0,
                seed,
                ..Default::default()
            })
            .unwrap();
            (0..20).map(|_| s.pick(&l, &[])).collect::<Vec<_>>()
        };
        assert_eq!(draw(3), draw(3));
        assert_ne!(draw(3), draw(4));
        assert!(Sampler::new(SamplingOptions {
            top_p: 0.0,
            ..Default::default()
        })
        .is_err());
    }
}

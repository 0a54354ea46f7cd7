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
    ) -> Result<Vec<i64>>;
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
}

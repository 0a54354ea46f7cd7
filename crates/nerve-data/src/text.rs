//! Character-level text: a tokenizer over a corpus' characters, the held-out split, and
//! batches of windows for language-model training.

use std::collections::HashMap;
use std::path::Path;

use nerve_core::Tensor;
use rand::{Rng, SeedableRng};
use rand_pcg::Pcg64Mcg;

use crate::error::{DataError, Result};

/// Maps each character of a vocabulary to its index (sorted by code point, like
/// `sorted(set(text))` in nanoGPT's char-level Shakespeare).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CharTokenizer {
    chars: Vec<char>,
    index: HashMap<char, i64>,
}

impl CharTokenizer {
    /// The vocabulary of every distinct character of `text`, in code-point order.
    pub fn from_text(text: &str) -> Self {
        let mut chars: Vec<char> = text.chars().collect();
        chars.sort_unstable();
        chars.dedup();
        Self::from_chars(chars)
    }

    /// A tokenizer whose token `i` is the `i`-th character of `vocab` (as stored by
    /// [`CharTokenizer::vocab`]); duplicates are refused.
    pub fn from_vocab(vocab: &str) -> Result<Self> {
        let chars: Vec<char> = vocab.chars().collect();
        let t = Self::from_chars(chars);
        if t.index.len() != t.chars.len() {
            return Err(DataError::Invalid(
                "character vocabulary: a character appears twice".into(),
            ));
        }
        Ok(t)
    }

    fn from_chars(chars: Vec<char>) -> Self {
        let index = chars
            .iter()
            .enumerate()
            .map(|(i, &c)| (c, i as i64))
            .collect();
        Self { chars, index }
    }

    /// The vocabulary as one string (token `i` is its `i`-th character).
    pub fn vocab(&self) -> String {
        self.chars.iter().collect()
    }

    /// Tokens in the vocabulary.
    pub fn len(&self) -> usize {
        self.chars.len()
    }

    /// Whether the vocabulary is empty.
    pub fn is_empty(&self) -> bool {
        self.chars.is_empty()
    }

    /// Token ids of `text`; characters outside the vocabulary are an error that lists them.
    pub fn encode(&self, text: &str) -> Result<Vec<i64>> {
        let mut unknown: Vec<char> = Vec::new();
        let ids: Vec<i64> = text
            .chars()
            .map(|c| match self.index.get(&c) {
                Some(&i) => i,
                None => {
                    if !unknown.contains(&c) {
                        unknown.push(c);
                    }
                    -1
                }
            })
            .collect();
        if !unknown.is_empty() {
            return Err(DataError::Invalid(format!(
                "characters not in the model's vocabulary: {}; the vocabulary is {:?}",
                unknown
                    .iter()
                    .map(|c| format!("{c:?}"))
                    .collect::<Vec<_>>()
                    .join(", "),
                self.vocab()
            )));
        }
        Ok(ids)
    }

    /// The text of token ids; an id outside the vocabulary is an error.
    pub fn decode(&self, ids: &[i64]) -> Result<String> {
        ids.iter()
            .map(|&i| {
                usize::try_from(i)
                    .ok()
                    .and_then(|i| self.chars.get(i).copied())
                    .ok_or_else(|| {
                        DataError::Invalid(format!(
                            "token {i} outside the vocabulary of {}",
                            self.len()
                        ))
                    })
            })
            .collect()
    }
}

/// Read a UTF-8 text file, with Windows line ends made `\n`.
pub fn read_text(path: &Path) -> Result<String> {
    let bytes = std::fs::read(path).map_err(|e| DataError::io(path, e))?;
    let text = String::from_utf8(bytes).map_err(|e| DataError::Format {
        path: path.to_path_buf(),
        msg: format!("not UTF-8 text ({e})"),
    })?;
    Ok(if text.contains('\r') {
        text.replace("\r\n", "\n")
    } else {
        text
    })
}

/// A tokenized corpus split into training tokens and the held-out last part.
#[derive(Clone, Debug)]
pub struct TextSplits {
    /// The first `1 − val_fraction` of the tokens.
    pub train: Vec<i64>,
    /// The last `val_fraction` of the tokens.
    pub val: Vec<i64>,
}

impl TextSplits {
    /// Hold out the last `val_fraction` of `ids` (nanoGPT's split).
    pub fn new(ids: Vec<i64>, val_fraction: f64) -> Self {
        let n_train = ((ids.len() as f64) * (1.0 - val_fraction)).round() as usize;
        let mut train = ids;
        let val = train.split_off(n_train.min(train.len()));
        Self { train, val }
    }
}

/// Inputs `[B, T]` and next-token targets `[B, T]` (i64) of the windows of `ids` starting at
/// `starts`, each `seq + 1` tokens long.
pub fn windows(ids: &[i64], starts: &[usize], seq: usize) -> Result<(Tensor, Tensor)> {
    let mut x = Vec::with_capacity(starts.len() * seq);
    let mut y = Vec::with_capacity(starts.len() * seq);
    for &s in starts {
        if s + seq + 1 > ids.len() {
            return Err(DataError::Invalid(format!(
                "window at {s} of {} tokens runs past the end of {} tokens",
                seq + 1,
                ids.len()
            )));
        }
        x.extend_from_slice(&ids[s..s + seq]);
        y.extend_from_slice(&ids[s + 1..s + seq + 1]);
    }
    let b = starts.len();
    Ok((
        Tensor::from_vec(x, [b, seq])?,
        Tensor::from_vec(y, [b, seq])?,
    ))
}

/// `batch` uniformly random window starts for training step `step` of a run seeded `seed`
/// (a pure function of both, so a resumed run draws the same batches).
pub fn random_starts(
    len: usize,
    seq: usize,
    batch: usize,
    seed: u64,
    step: u64,
) -> Result<Vec<usize>> {
    if len < seq + 1 {
        return Err(DataError::Invalid(format!(
            "{len} tokens are fewer than one window of {} (sequence length {seq} + 1)",
            seq + 1
        )));
    }
    let mut rng =
        Pcg64Mcg::seed_from_u64(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ step.wrapping_add(1));
    Ok((0..batch)
        .map(|_| rng.gen_range(0..=len - seq - 1))
        .collect())
}

/// `n` window starts spread evenly over `len` tokens (`start_i = ⌊i·(len − seq − 1)/n⌋`):
/// the fixed evaluation windows, the same in `tools/torch_lm_train.py`.
pub fn eval_starts(len: usize, seq: usize, n: usize) -> Vec<usize> {
    if len < seq + 1 || n == 0 {
        return Vec::new();
    }
    let span = len - seq - 1;
    (0..n).map(|i| i * span / n).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_errors() {
        let t = CharTokenizer::from_text("hello, world\n");
        assert_eq!(t.vocab(), "\n ,dehlorw");
        let ids = t.encode("world").unwrap();
        assert_eq!(t.decode(&ids).unwrap(), "world");
        let e = t.encode("Hex!").unwrap_err().to_string();
        assert!(
            e.contains("'H'") && e.contains("'x'") && e.contains("'!'"),
            "{e}"
        );
        assert!(t.decode(&[99]).is_err());
        assert_eq!(CharTokenizer::from_vocab(&t.vocab()).unwrap(), t);
        assert!(CharTokenizer::from_vocab("abca").is_err());
    }

    #[test]
    fn splits_and_windows() {
        let s = TextSplits::new((0..100).collect(), 0.1);
        assert_eq!((s.train.len(), s.val[0]), (90, 90));
        let (x, y) = windows(&s.train, &[0, 5], 4).unwrap();
        assert_eq!(x.to_vec::<i64>().unwrap(), [0, 1, 2, 3, 5, 6, 7, 8]);
        assert_eq!(y.to_vec::<i64>().unwrap(), [1, 2, 3, 4, 6, 7, 8, 9]);
        assert!(windows(&s.train, &[86], 4).is_err());
        let a = random_starts(90, 4, 8, 7, 3).unwrap();
        assert_eq!(a, random_starts(90, 4, 8, 7, 3).unwrap());
        assert_ne!(a, random_starts(90, 4, 8, 7, 4).unwrap());
        assert!(a.iter().all(|&s| s + 5 <= 90));
        assert_eq!(eval_starts(10, 4, 2), [0, 2]);
        assert!(random_starts(4, 4, 1, 0, 0).is_err());
    }
}

//! `nerve embed`: sentence embeddings with a sentence-transformers BERT model (by default
//! all-MiniLM-L6-v2, fetched by `nerve data get minilm`), printed as JSON, written to a file,
//! or compared as a cosine-similarity matrix.

use std::collections::HashMap;
use std::io::{BufRead, Write};
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use nerve_core::Tensor;

use crate::data::data_root;

/// The folder `nerve data get minilm` fills, under [`data_root`].
const MINILM_FOLDER: &str = "minilm";

/// Arguments of `nerve embed`.
#[derive(clap::Args)]
pub struct EmbedArgs {
    /// Sentences to embed (or use --file).
    #[arg(conflicts_with = "file")]
    pub sentences: Vec<String>,
    /// A UTF-8 text file with one sentence per line (`-` for standard input); empty lines
    /// are skipped.
    #[arg(long)]
    pub file: Option<PathBuf>,
    /// Folder of a sentence-transformers BERT model (config.json, model.safetensors,
    /// tokenizer.json, sentence_bert_config.json); default: all-MiniLM-L6-v2 from `nerve
    /// data get minilm`.
    #[arg(long)]
    pub model: Option<PathBuf>,
    /// Sentences per forward pass.
    #[arg(long, default_value_t = 32)]
    pub batch_size: usize,
    /// Write the embeddings to this file instead of standard output: `.safetensors` (tensor
    /// `embeddings` [N, dim]), `.jsonl` (one `{"sentence", "embedding"}` object per line) or
    /// `.json` (an array of them).
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Print the cosine-similarity matrix of the sentences (instead of the embeddings, unless
    /// --out is given).
    #[arg(long)]
    pub similarity: bool,
}

/// The model folder: `--model`, else the cached all-MiniLM-L6-v2.
pub(crate) fn model_dir(arg: Option<&Path>) -> Result<PathBuf> {
    if let Some(dir) = arg {
        if !dir.join("config.json").exists() {
            bail!(
                "--model {}: no config.json there (expected a sentence-transformers folder: \
                 config.json, model.safetensors, tokenizer.json)",
                dir.display()
            );
        }
        return Ok(dir.to_path_buf());
    }
    let dir = data_root().join(MINILM_FOLDER);
    if !dir.join("model.safetensors").exists() {
        bail!(
            "{} holds no all-MiniLM-L6-v2 model: run `nerve data get minilm` first, or pass \
             --model DIR",
            dir.display()
        );
    }
    Ok(dir)
}

/// The sentences of the arguments or of `--file`.
fn read_sentences(a: &EmbedArgs) -> Result<Vec<String>> {
    let Some(path) = &a.file else {
        if a.sentences.is_empty() {
            bail!("nothing to embed: give sentences as arguments or --file FILE");
        }
        return Ok(a.sentences.clone());
    };
    let lines: Vec<String> = if path.as_os_str() == "-" {
        std::io::stdin()
            .lock()
            .lines()
            .collect::<std::io::Result<_>>()
            .context("reading sentences from standard input")?
    } else {
        std::fs::read_to_string(path)
            .with_context(|| format!("reading {}", path.display()))?
            .lines()
            .map(str::to_string)
            .collect()
    };
    let sentences: Vec<String> = lines.into_iter().filter(|l| !l.trim().is_empty()).collect();
    if sentences.is_empty() {
        bail!("{}: no sentences (it is empty)", path.display());
    }
    Ok(sentences)
}

/// `nerve embed`: embed the sentences and print or write them.
pub fn run(a: &EmbedArgs) -> Result<()> {
    if a.batch_size == 0 {
        bail!("--batch-size must be at least 1");
    }
    if let Some(path) = &a.out {
        let ext = path.extension().and_then(|e| e.to_str()).unwrap_or("");
        if !OUT_FORMATS.contains(&ext) {
            bail!(
                "--out {}: unknown format (use .safetensors, .jsonl or .json)",
                path.display()
            );
        }
    }
    let sentences = read_sentences(a)?;
    let dir = model_dir(a.model.as_deref())?;
    let (bert, tok) = nerve_models::load_sentence_encoder(&dir)
        .with_context(|| format!("loading the sentence encoder in {}", dir.display()))?;
    let refs: Vec<&str> = sentences.iter().map(String::as_str).collect();
    let emb = bert.embed(&tok, &refs, a.batch_size)?;
    let dim = emb.dims()[1];
    let rows: Vec<f32> = emb.to_vec()?;
    let rows: Vec<&[f32]> = rows.chunks(dim).collect();

    let stdout = std::io::stdout();
    let mut out = std::io::BufWriter::new(stdout.lock());
    match &a.out {
        Some(path) => write_file(path, &emb, &sentences, &rows, &dir)?,
        None if a.similarity => {}
        None => {
            for r in &rows {
                writeln!(out, "{}", serde_json::to_string(r)?)?;
            }
        }
    }
    if a.similarity {
        print_similarity(&mut out, &sentences, &rows)?;
    }
    out.flush()?;
    if let Some(path) = &a.out {
        eprintln!(
            "wrote {} embeddings of dimension {dim} to {}",
            rows.len(),
            path.display()
        );
    }
    Ok(())
}

/// One sentence and its embedding in a `.jsonl`/`.json` file.
#[derive(serde::Serialize)]
struct Row<'a> {
    sentence: &'a str,
    embedding: &'a [f32],
}

/// The formats `--out` may name, by extension.
const OUT_FORMATS: [&str; 3] = ["safetensors", "jsonl", "json"];

/// Write the embeddings to `path`, in the format its extension names.
fn write_file(
    path: &Path,
    emb: &Tensor,
    sentences: &[String],
    rows: &[&[f32]],
    model: &Path,
) -> Result<()> {
    let ext = path.extension().and_then(|e| e.to_str()).unwrap_or("");
    let objects = || {
        sentences.iter().zip(rows).map(|(s, r)| Row {
            sentence: s,
            embedding: r,
        })
    };
    let bytes = match ext {
        "safetensors" => {
            let meta = HashMap::from([
                ("model".to_string(), model.display().to_string()),
                ("sentences".to_string(), serde_json::to_string(sentences)?),
            ]);
            nerve_nn::checkpoint::save_safetensors(
                path,
                &[("embeddings".to_string(), emb.clone())],
                &meta,
            )?;
            return Ok(());
        }
        "jsonl" => {
            let mut s = String::new();
            for o in objects() {
                s.push_str(&serde_json::to_string(&o)?);
                s.push('\n');
            }
            s.into_bytes()
        }
        "json" => {
            let mut s = serde_json::to_string(&objects().collect::<Vec<_>>())?;
            s.push('\n');
            s.into_bytes()
        }
        _ => bail!("--out {}: unknown format", path.display()),
    };
    nerve_nn::checkpoint::write_atomic(path, &bytes)?;
    Ok(())
}

/// The cosine-similarity matrix of unit-length rows: a numbered legend of the sentences,
/// then one line per sentence.
fn print_similarity(out: &mut impl Write, sentences: &[String], rows: &[&[f32]]) -> Result<()> {
    for (i, s) in sentences.iter().enumerate() {
        writeln!(out, "# {i}: {s}")?;
    }
    let width = 8;
    write!(out, "{:>4}", "")?;
    for j in 0..rows.len() {
        write!(out, "{j:>width$}")?;
    }
    writeln!(out)?;
    for (i, a) in rows.iter().enumerate() {
        write!(out, "{i:>4}")?;
        for b in rows {
            let cos: f32 = a.iter().zip(b.iter()).map(|(x, y)| x * y).sum();
            write!(out, "{cos:>width$.4}")?;
        }
        writeln!(out)?;
    }
    Ok(())
}

//! Pretrained models: `nerve generate --model FILE.gguf`.

use std::io::Write;
use std::path::PathBuf;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use nerve_data::ChatMessage;
use nerve_models::{Llama, QuantLlama, Sampler, SamplingOptions};

use crate::data::{data_root, SMOLLM2_FILE};
use crate::lm::GenerateArgs;

/// The file `--model` names: a path, or `smollm2` for the file `nerve data get smollm2`
/// fetched.
pub(crate) fn model_file(arg: &std::path::Path) -> Result<PathBuf> {
    if arg.exists() {
        return Ok(arg.to_path_buf());
    }
    if arg.as_os_str() == "smollm2" {
        let f = data_root().join("smollm2").join(SMOLLM2_FILE);
        if f.exists() {
            return Ok(f);
        }
        bail!(
            "{} is not there: run `nerve data get smollm2` first",
            f.display()
        );
    }
    bail!("--model {}: no such file", arg.display())
}

/// A pretrained model in f32 or with quantised weights (`--quantized`).
enum Model {
    F32(Llama),
    Quantized(QuantLlama),
}

impl Model {
    /// As `Llama::generate_with`.
    fn generate_with(
        &self,
        prompt: &[i64],
        n: usize,
        stop: &[i64],
        choose: impl FnMut(&[f32], &[i64]) -> i64,
        on_token: impl FnMut(i64) -> nerve_core::Result<()>,
    ) -> nerve_core::Result<Vec<i64>> {
        match self {
            Model::F32(m) => m.generate_with(prompt, n, stop, choose, on_token),
            Model::Quantized(m) => m.generate_with(prompt, n, stop, choose, on_token),
        }
    }
}

/// `nerve generate --model FILE.gguf`: continue (or, with `--chat`, answer) the prompt,
/// printing tokens as they come.
pub fn generate(a: &GenerateArgs) -> Result<()> {
    let arg = a
        .model
        .as_ref()
        .context("--model or --checkpoint is needed")?;
    let path = model_file(arg)?;
    let t_load = Instant::now();
    if a.quantized && a.adapter.is_some() {
        bail!("--adapter is merged into f32 weights: it cannot be used with --quantized");
    }
    let (model, tok) = if a.quantized {
        let (m, tok) = nerve_models::gguf::load_llama_quantized(&path)?;
        (Model::Quantized(m), tok)
    } else {
        let (m, tok) = nerve_models::gguf::load_llama(&path)?;
        if let Some(dir) = &a.adapter {
            let c = nerve_nn::lora::load(&m, dir)?;
            let n = nerve_nn::lora::merge(&m)?;
            eprintln!(
                "merged the LoRA adapter of {} (r={}, {n} modules)",
                dir.display(),
                c.r
            );
        }
        (Model::F32(m), tok)
    };
    let load_secs = t_load.elapsed().as_secs_f64();
    let text = if a.chat {
        let mut msgs = Vec::new();
        if let Some(s) = &a.system {
            msgs.push(ChatMessage::new("system", s));
        }
        msgs.push(ChatMessage::new("user", &a.prompt));
        tok.apply_chat_template(&msgs, true)?
    } else {
        a.prompt.clone()
    };
    let prompt: Vec<i64> = tok
        .encode(&text, true)?
        .into_iter()
        .map(i64::from)
        .collect();
    let mut sampler = Sampler::new(SamplingOptions {
        temperature: a.temperature,
        top_k: a.top_k,
        top_p: a.top_p,
        repetition_penalty: a.repetition_penalty,
        seed: a.seed,
    })?;
    // Stop at the end of the sequence (for a chat model, the end of its turn).
    let mut stop: Vec<i64> = tok.eos_id().map(i64::from).into_iter().collect();
    if let Some(end) = tok.token_to_id("<|im_end|>") {
        stop.push(end as i64);
    }
    if !a.chat {
        print!("{}", a.prompt);
    }
    let mut stream = tok.stream(true);
    let mut out = std::io::stdout().lock();
    let t0 = Instant::now();
    let pb = crate::generation_bar(a.tokens);
    let mut first = None;
    let new = model.generate_with(
        &prompt,
        a.tokens,
        &stop,
        |logits, seen| sampler.pick(logits, seen),
        |t| {
            first.get_or_insert_with(|| t0.elapsed().as_secs_f64());
            let piece = stream
                .push(t as u32)
                .map_err(|e| nerve_core::Error::invalid("generate", e.to_string()))?;
            // A closed stdout (e.g. `| head`) ends generation quietly.
            let _ = write!(out, "{piece}").and_then(|_| out.flush());
            pb.inc(1);
            Ok(())
        },
    )?;
    pb.finish_and_clear();
    let _ = writeln!(out);
    let secs = t0.elapsed().as_secs_f64();
    let prefill = first.unwrap_or(secs);
    let decode = (new.len().saturating_sub(1)) as f64 / (secs - prefill).max(1e-9);
    eprintln!(
        "({} prompt tokens, {} new tokens; load {load_secs:.2}s, prompt {prefill:.2}s, \
         {decode:.1} tokens/s after the first)",
        prompt.len(),
        new.len()
    );
    Ok(())
}

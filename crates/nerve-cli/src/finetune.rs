//! `nerve finetune`: adapt a pretrained model, with LoRA adapters (the default) or fully.
//!
//! - A GGUF language model (SmolLM2: `--model smollm2`) on a text (`--data shakespeare` or a
//!   file): causal language modelling on random windows, the held-out loss (the text's last
//!   part) before, during and after; the adapter saved as PEFT saves one.
//! - A sentence encoder (all-MiniLM-L6-v2: `--model minilm`, or a sentence-transformers
//!   folder) with a classification head on labelled sentences (a TSV file `label<TAB>text`;
//!   by default 280 customer-support messages in 5 intents, embedded in nerve;
//!   `crates/nerve-cli/data/reviews.tsv` is a harder sentiment set): accuracy on the held-out
//!   part before and after each epoch.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, Context, Result};
use nerve_core::{no_grad, Generator, Tensor};
use nerve_distributed::{DataParallel, SingleProcess};
use nerve_models::{causal_lm_loss, BertClassifier, Llama, Sampler, SamplingOptions};
use nerve_nn::checkpoint::save_safetensors;
use nerve_nn::lora::{self, LoraConfig, TargetModules};
use nerve_nn::{loss, Adam, LrSchedule, Module, ModuleExt};
use serde_json::Value;

use crate::trainer::{self, MicroBatch, RunOptions, Task};

/// The labelled messages `nerve finetune --model minilm` uses without `--data` (written for
/// nerve: 56 each of refund, shipping, account, payment, product).
const INTENTS_TSV: &str = include_str!("../data/intents.tsv");

/// Arguments of `nerve finetune`.
#[derive(clap::Args)]
pub struct FinetuneArgs {
    /// The pretrained model: `smollm2` or a GGUF file (language modelling), `minilm` or a
    /// sentence-transformers folder (sentence classification). Needed unless --resume.
    #[arg(long)]
    model: Option<PathBuf>,
    /// Language models: `shakespeare` (the default; `nerve data get shakespeare`) or a UTF-8
    /// text file. Classifiers: a TSV file with a `label<TAB>text` header (default: the
    /// embedded customer-support intents).
    #[arg(long)]
    data: Option<String>,
    /// Train every parameter (except those --freeze names) instead of LoRA adapters.
    #[arg(long)]
    full: bool,
    /// Freeze the parameters whose names match this glob (`*` = anything), e.g.
    /// `model.embed_tokens.*` or `model.layers.*.mlp.*`; repeatable. With --full.
    #[arg(long, requires = "full")]
    freeze: Vec<String>,
    /// LoRA rank.
    #[arg(long, default_value_t = 8)]
    lora_rank: usize,
    /// LoRA alpha (the update is scaled by alpha / rank).
    #[arg(long, default_value_t = 16.0)]
    lora_alpha: f64,
    /// Dropout on the adapters' input.
    #[arg(long, default_value_t = 0.05)]
    lora_dropout: f64,
    /// Modules that get adapters: names (matched as PEFT does, by the end of the module's
    /// dotted name), comma-separated, or `all-linear`. Default: q_proj,v_proj for Llama,
    /// query,value for BERT (PEFT's defaults).
    #[arg(long, value_delimiter = ',')]
    target_modules: Vec<String>,
    /// Optimizer steps (language models).
    #[arg(long, default_value_t = 200)]
    steps: usize,
    /// Epochs (classifiers).
    #[arg(long, default_value_t = 8)]
    epochs: usize,
    /// Sequences per batch (default: 4 for language models, 16 for classifiers).
    #[arg(long)]
    batch_size: Option<usize>,
    /// Tokens per training window (language models).
    #[arg(long, default_value_t = 256)]
    seq_len: usize,
    /// Learning rate (AdamW); default 2e-4 with LoRA, 2e-5 with --full (classifiers: 1e-3
    /// and 5e-5).
    #[arg(long)]
    lr: Option<f64>,
    /// AdamW weight decay.
    #[arg(long, default_value_t = 0.01)]
    weight_decay: f64,
    /// Clip gradients to this global L2 norm (0 = off).
    #[arg(long, default_value_t = 1.0)]
    clip_grad_norm: f64,
    /// Held-out windows per evaluation (language models).
    #[arg(long, default_value_t = 16)]
    eval_windows: usize,
    /// Keep every activation instead of recomputing each layer in backward (language models;
    /// faster, much more memory).
    #[arg(long)]
    no_gradient_checkpointing: bool,
    /// Fraction held out: the text's last part, or a seeded sample of the labelled set
    /// (default 0.1 for text, 0.25 for labelled sentences).
    #[arg(long)]
    val_fraction: Option<f64>,
    /// Seed of the adapters' initialisation, the batches and dropout.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// The run folder's options (--out, --resume, --eval-every, checkpoints, output).
    #[command(flatten)]
    pub(crate) run: RunOptions,
}

impl FinetuneArgs {
    /// --model (empty when not given).
    fn model(&self) -> &Path {
        self.model.as_deref().unwrap_or(Path::new(""))
    }

    /// The run folder: --out, or `runs/finetune-<model>`.
    pub(crate) fn out(&self) -> PathBuf {
        self.run.out.clone().unwrap_or_else(|| {
            let stem = self
                .model()
                .file_stem()
                .map_or("model".into(), |s| s.to_string_lossy().into_owned());
            PathBuf::from("runs").join(format!("finetune-{stem}"))
        })
    }

    /// LoRA's configuration with `default_targets` unless --target-modules is given.
    fn lora_config(&self, default_targets: &[&str], task: &str) -> LoraConfig {
        let mut c = LoraConfig::new(self.lora_rank, self.lora_alpha, default_targets);
        c.lora_dropout = self.lora_dropout;
        c.task_type = Some(task.into());
        c.base_model_name_or_path = Some(self.model().display().to_string());
        match self.target_modules.as_slice() {
            [] => {}
            [one] if one == "all-linear" => {
                c.target_modules = TargetModules::Pattern(one.clone());
            }
            names => c.target_modules = TargetModules::Names(names.to_vec()),
        }
        c
    }

    /// Adapters or full training (with --freeze); returns the LoRA configuration when
    /// adapters were attached.
    fn prepare(&self, model: &dyn Module, lora: LoraConfig) -> Result<Option<LoraConfig>> {
        let config = if self.full {
            model.set_frozen("", false);
            for pattern in &self.freeze {
                if model.set_frozen_matching(pattern, true) == 0 {
                    bail!("--freeze {pattern}: no parameter name matches");
                }
            }
            None
        } else {
            let adapted = lora::apply(model, &lora)?;
            println!(
                "LoRA r={} alpha={} dropout={} on {} modules ({} … {})",
                lora.r,
                lora.lora_alpha,
                lora.lora_dropout,
                adapted.len(),
                adapted[0],
                adapted[adapted.len() - 1]
            );
            Some(lora)
        };
        Ok(config)
    }

    fn check(&self) -> Result<()> {
        if self.lora_rank == 0 {
            bail!("--lora-rank must be at least 1");
        }
        if let Some(f) = self
            .val_fraction
            .filter(|f| !(0.0..1.0).contains(f) || *f == 0.0)
        {
            bail!("--val-fraction {f}: must be in (0, 1)");
        }
        if self.batch_size == Some(0) {
            bail!("--batch-size must be at least 1");
        }
        Ok(())
    }
}

/// PEFT's `print_trainable_parameters` line.
fn print_trainable(model: &dyn Module) {
    let (t, all) = (model.num_trainable_parameters(), model.num_parameters());
    println!(
        "trainable params: {t} || all params: {all} || trainable%: {:.4}",
        100.0 * t as f64 / all as f64
    );
}

/// The peak resident memory of this process so far, in MiB (Linux; `None` elsewhere).
pub fn peak_rss_mb() -> Option<f64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb / 1024.0)
}

/// `nerve finetune`.
pub fn run(a: &FinetuneArgs) -> Result<()> {
    a.check()?;
    if a.model().as_os_str().is_empty() {
        bail!("--model is needed: smollm2, a .gguf file, minilm or a sentence-transformers folder");
    }
    let is_gguf =
        a.model().as_os_str() == "smollm2" || a.model().extension().is_some_and(|e| e == "gguf");
    if is_gguf {
        finetune_lm(a)
    } else if a.model().as_os_str() == "minilm" || a.model().join("config.json").exists() {
        finetune_classifier(a)
    } else {
        bail!(
            "--model {}: not `smollm2`, a .gguf file, `minilm` or a sentence-transformers folder",
            a.model().display()
        )
    }
}

/// Token ids of a long text, encoded in pieces of about 64 KiB cut before a line that starts
/// with a non-space character (so no token spans a cut): the tokenizer's per-token
/// bookkeeping for a whole 5 MB corpus at once would take more memory than the model.
fn encode_long(tok: &nerve_data::Tokenizer, text: &str) -> Result<Vec<i64>> {
    let mut ids = Vec::new();
    let mut rest = text;
    while !rest.is_empty() {
        let mut cut = rest.len();
        if rest.len() > 1 << 16 {
            let b = rest.as_bytes();
            cut = (1 << 16..b.len() - 1)
                .find(|&i| b[i] == b'\n' && !b[i + 1].is_ascii_whitespace())
                .map_or(rest.len(), |i| i + 1);
        }
        let (piece, tail) = rest.split_at(cut);
        ids.extend(tok.encode(piece, false)?.into_iter().map(i64::from));
        rest = tail;
    }
    Ok(ids)
}

/// Mean loss of `model` on `windows` (each `[1, seq]`), batched by `batch`.
fn held_out_loss(model: &Llama, windows: &[Vec<i64>], batch: usize) -> Result<f64> {
    model.eval();
    let mut total = 0.0;
    for chunk in windows.chunks(batch) {
        let ids = stack(chunk)?;
        let l = no_grad(|| causal_lm_loss(&model.forward(&ids)?, &ids))?;
        total += l.item::<f32>()? as f64 * chunk.len() as f64;
    }
    model.train();
    Ok(total / windows.len() as f64)
}

/// Rows of equal length as a `[rows, len]` i64 tensor.
fn stack(rows: &[Vec<i64>]) -> Result<Tensor> {
    let len = rows[0].len();
    Ok(Tensor::from_vec(rows.concat(), [rows.len(), len])?)
}

fn finetune_lm(a: &FinetuneArgs) -> Result<()> {
    let path = crate::pretrained::model_file(a.model())?;
    let t0 = Instant::now();
    let (model, tok) = nerve_models::gguf::load_llama(&path)?;
    let spec = a.data.clone().unwrap_or_else(|| "shakespeare".into());
    let text = crate::lm::load_corpus(&spec, None)?;
    let ids = encode_long(&tok, &text)?;
    drop(text);
    let seq = a.seq_len;
    if seq < 2 || seq > model.config().max_position_embeddings {
        bail!(
            "--seq-len {seq}: must be in 2..={} (the model's max_position_embeddings)",
            model.config().max_position_embeddings
        );
    }
    let val_fraction = a.val_fraction.unwrap_or(0.1);
    let split = ids.len() - (ids.len() as f64 * val_fraction) as usize;
    let (train, val) = ids.split_at(split);
    if train.len() <= seq || val.len() < seq {
        bail!(
            "--data {spec}: {} tokens are too few for windows of {seq} with {val_fraction} held out",
            ids.len()
        );
    }
    let batch = a.batch_size.unwrap_or(4);
    // Held-out windows evenly spaced over the held-out part.
    let n_val = a.eval_windows.max(1).min(val.len() / seq);
    let stride = (val.len() - seq) / n_val.max(1);
    let val_windows: Vec<Vec<i64>> = (0..n_val)
        .map(|i| val[i * stride..i * stride + seq].to_vec())
        .collect();
    println!(
        "{}: {} layers, {} parameters; {spec}: {} tokens ({} train, {} held out); loaded in {:.1}s",
        path.display(),
        model.config().num_hidden_layers,
        model.num_parameters(),
        ids.len(),
        train.len(),
        val.len(),
        t0.elapsed().as_secs_f64()
    );

    nerve_core::manual_seed(a.seed);
    model.set_gradient_checkpointing(!a.no_gradient_checkpointing);
    let lora_config = a.prepare(&model, a.lora_config(&["q_proj", "v_proj"], "CAUSAL_LM"))?;
    print_trainable(&model);
    let lr = a.lr.unwrap_or(if a.full { 2e-5 } else { 2e-4 });
    let opt = Box::new(Adam::adamw(
        model.trainable_parameters(),
        lr,
        a.weight_decay,
    ));
    let mut set = a
        .run
        .settings(a.steps, 50, a.clip_grad_norm, lr, LrSchedule::Constant)?;
    set.trainable_only = true;
    let meta = HashMap::from([
        ("nerve.model".to_string(), "finetune-lm".to_string()),
        ("nerve.base".to_string(), path.display().to_string()),
        ("nerve.data".to_string(), spec.clone()),
        ("format".to_string(), "pt".to_string()),
    ]);
    let dp = DataParallel::new(Box::new(SingleProcess));
    let mut trainer = trainer::start(&a.run, &model, opt, set, &Value::Null, &meta, &dp)?;
    let fresh = trainer.step() == 0;
    let v0 = if fresh {
        let v0 = held_out_loss(&model, &val_windows, batch)?;
        println!("step 0: held-out loss {v0:.4} ({n_val} windows of {seq} tokens)");
        Some(v0)
    } else {
        None
    };
    let mut task = LmFinetune {
        model: &model,
        train,
        val_windows,
        seq,
        batch,
        seed: a.seed,
        lora: lora_config,
        meta,
        last: None,
    };
    let t_train = Instant::now();
    trainer.fit(&mut task)?;
    if let (Some(v0), Some(v)) = (v0, task.last) {
        println!(
            "held-out loss {v0:.4} -> {v:.4} after {} steps of {batch}x{seq} tokens in {:.0}s; peak memory {:.0} MiB",
            a.steps,
            t_train.elapsed().as_secs_f64(),
            peak_rss_mb().unwrap_or(f64::NAN)
        );
    }

    // A sample from the adapted model.
    model.eval();
    let prompt: Vec<i64> = tok
        .encode("ROMEO:", false)?
        .into_iter()
        .map(i64::from)
        .collect();
    let mut sampler = Sampler::new(SamplingOptions {
        temperature: 0.8,
        top_k: 40,
        seed: a.seed,
        ..Default::default()
    })?;
    let stop: Vec<i64> = tok.eos_id().map(i64::from).into_iter().collect();
    let new = model.generate_with(&prompt, 80, &stop, |l, s| sampler.pick(l, s), |_| Ok(()))?;
    let all: Vec<u32> = prompt.iter().chain(&new).map(|&t| t as u32).collect();
    println!(
        "--- sample ---\n{}\n--------------",
        tok.decode(&all, true)?
    );
    Ok(())
}

/// Causal language modelling on random windows of the training tokens (drawn from the seed
/// and the step, so a resumed run draws the same); the loss on fixed held-out windows.
struct LmFinetune<'a> {
    model: &'a Llama,
    train: &'a [i64],
    val_windows: Vec<Vec<i64>>,
    seq: usize,
    batch: usize,
    seed: u64,
    /// The adapters' configuration (`None`: full fine-tuning).
    lora: Option<LoraConfig>,
    meta: HashMap<String, String>,
    /// The latest held-out loss.
    last: Option<f64>,
}

impl Task for LmFinetune<'_> {
    fn micro_step(&mut self, step: usize, _micro: usize, n: usize) -> Result<MicroBatch> {
        let mut gen = Generator::new(self.seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ step as u64);
        let rows: Vec<Vec<i64>> = (0..self.batch)
            .map(|_| {
                let s = gen.below((self.train.len() - self.seq) as u64) as usize;
                self.train[s..s + self.seq].to_vec()
            })
            .collect();
        let x = stack(&rows)?;
        let l = causal_lm_loss(&self.model.forward(&x)?, &x)?;
        trainer::backward_mean(&l, n, 1.0)?;
        Ok(MicroBatch {
            loss: l.item::<f32>()? as f64,
            samples: self.batch * self.seq,
            correct: None,
        })
    }

    fn micro_batches(&self, _step: usize) -> usize {
        1
    }

    fn evaluate(&mut self) -> Result<Vec<(&'static str, f64)>> {
        let v = held_out_loss(self.model, &self.val_windows, self.batch)?;
        self.last = Some(v);
        Ok(vec![("val_loss", v)])
    }

    fn meta(&self) -> HashMap<String, String> {
        self.meta.clone()
    }

    fn throughput_key(&self) -> &'static str {
        "tokens_per_s"
    }

    /// The adapter as PEFT saves it (`adapter/`, `best-adapter/`); fully fine-tuned, the
    /// trainer's `model.safetensors` with transformers' names.
    fn export(&self, dir: &Path, prefix: &str) -> Result<bool> {
        match &self.lora {
            Some(c) => {
                lora::save(self.model, c, dir.join(format!("{prefix}adapter")))?;
                Ok(true)
            }
            None => Ok(false),
        }
    }
}

/// Labelled sentences of a `label<TAB>text` file with that header.
fn read_labelled(spec: Option<&str>) -> Result<(Vec<(String, String)>, String)> {
    let (text, name) = match spec {
        None => (INTENTS_TSV.to_string(), "the embedded intents".to_string()),
        Some(p) => (
            std::fs::read_to_string(p).with_context(|| format!("--data {p}"))?,
            p.to_string(),
        ),
    };
    let mut lines = text.lines();
    if lines.next().map(str::trim) != Some("label\ttext") {
        bail!("{name}: the first line must be the header `label<TAB>text`");
    }
    let mut rows = Vec::new();
    for (i, line) in lines.enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let Some((label, sentence)) = line.split_once('\t') else {
            bail!("{name}: line {}: expected `label<TAB>text`", i + 2);
        };
        if label.is_empty() || sentence.trim().is_empty() {
            bail!("{name}: line {}: empty label or text", i + 2);
        }
        rows.push((label.to_string(), sentence.trim().to_string()));
    }
    Ok((rows, name))
}

/// Accuracy and mean loss of `model` on `(sentence, class)` pairs.
fn classify_eval(
    model: &BertClassifier,
    tok: &nerve_data::Tokenizer,
    rows: &[(&str, i64)],
    batch: usize,
) -> Result<(f64, f64)> {
    model.eval();
    let (mut correct, mut total_loss) = (0usize, 0.0);
    for chunk in rows.chunks(batch) {
        let sentences: Vec<&str> = chunk.iter().map(|r| r.0).collect();
        let y = Tensor::from_vec(chunk.iter().map(|r| r.1).collect::<Vec<_>>(), [chunk.len()])?;
        let inputs = model.bert.tokenize(tok, &sentences)?;
        let logits = no_grad(|| model.forward_inputs(&inputs))?;
        let l = no_grad(|| loss::cross_entropy(&logits, &y, &Default::default()))?;
        total_loss += l.item::<f32>()? as f64 * chunk.len() as f64;
        let pred: Vec<i64> = logits.argmax(-1, false)?.to_vec()?;
        correct += pred.iter().zip(chunk).filter(|(p, r)| **p == r.1).count();
    }
    model.train();
    Ok((
        correct as f64 / rows.len() as f64,
        total_loss / rows.len() as f64,
    ))
}

fn finetune_classifier(a: &FinetuneArgs) -> Result<()> {
    let dir = if a.model().as_os_str() == "minilm" {
        crate::embed::model_dir(None)?
    } else {
        crate::embed::model_dir(Some(a.model()))?
    };
    let (bert, tok) = nerve_models::load_sentence_encoder(&dir)?;
    let (rows, name) = read_labelled(a.data.as_deref())?;
    let mut labels: Vec<String> = rows.iter().map(|r| r.0.clone()).collect();
    labels.sort();
    labels.dedup();
    if labels.len() < 2 {
        bail!("{name}: needs at least two labels, found {labels:?}");
    }
    let class = |l: &str| labels.iter().position(|x| x == l).unwrap() as i64;
    // A seeded shuffle, then the last part held out.
    let mut gen = Generator::new(a.seed);
    let order = gen.permutation(rows.len());
    let n_test = ((rows.len() as f64) * a.val_fraction.unwrap_or(0.25)).round() as usize;
    if n_test == 0 || n_test >= rows.len() {
        bail!(
            "{name}: {} sentences are too few to hold some out",
            rows.len()
        );
    }
    let pairs: Vec<(&str, i64)> = order
        .iter()
        .map(|&i| (rows[i].1.as_str(), class(&rows[i].0)))
        .collect();
    let (train, test) = pairs.split_at(rows.len() - n_test);
    println!(
        "{}: {} labels {labels:?}; {} sentences ({} train, {} held out)",
        name,
        labels.len(),
        rows.len(),
        train.len(),
        test.len()
    );

    nerve_core::manual_seed(a.seed);
    let model = BertClassifier::new(bert, labels.len(), 0.1)?;
    let lora_config = a.prepare(&model, a.lora_config(&["query", "value"], "SEQ_CLS"))?;
    // The head is new: it always trains (PEFT's modules_to_save).
    model.classifier.weight.set_requires_grad(true);
    if let Some(b) = &model.classifier.bias {
        b.set_requires_grad(true);
    }
    print_trainable(&model);
    let lr = a.lr.unwrap_or(if a.full { 5e-5 } else { 1e-3 });
    let opt = Box::new(Adam::adamw(
        model.trainable_parameters(),
        lr,
        a.weight_decay,
    ));
    let batch = a.batch_size.unwrap_or(16);
    let steps_per_epoch = train.len().div_ceil(batch);
    let mut set = a.run.settings(
        a.epochs * steps_per_epoch,
        steps_per_epoch,
        a.clip_grad_norm,
        lr,
        LrSchedule::Constant,
    )?;
    set.trainable_only = true;
    let meta = HashMap::from([
        ("nerve.model".to_string(), "finetune-classifier".to_string()),
        ("nerve.base".to_string(), dir.display().to_string()),
        ("nerve.data".to_string(), name.clone()),
        ("labels".to_string(), labels.join("\n")),
    ]);
    let dp = DataParallel::new(Box::new(SingleProcess));
    let mut trainer = trainer::start(&a.run, &model, opt, set, &Value::Null, &meta, &dp)?;
    let acc0 = if trainer.step() == 0 {
        let (acc0, loss0) = classify_eval(&model, &tok, test, 64)?;
        println!(
            "epoch 0: held-out accuracy {:.1}% (loss {loss0:.4})",
            100.0 * acc0
        );
        Some(acc0)
    } else {
        None
    };
    let mut task = ClassifierFinetune {
        model: &model,
        tok: &tok,
        train,
        test,
        batch,
        steps_per_epoch,
        seed: a.seed,
        order: None,
        lora: lora_config,
        meta,
        last: None,
    };
    let t0 = Instant::now();
    trainer.fit(&mut task)?;
    if let (Some(acc0), Some(acc)) = (acc0, task.last) {
        println!(
            "held-out accuracy {:.1}% -> {:.1}% on {} sentences after {} epochs in {:.0}s",
            100.0 * acc0,
            100.0 * acc,
            test.len(),
            a.epochs,
            t0.elapsed().as_secs_f64(),
        );
    }
    Ok(())
}

/// A sentence classifier on labelled sentences: a seeded shuffle each epoch, the held-out
/// loss and accuracy at each evaluation.
struct ClassifierFinetune<'a> {
    model: &'a BertClassifier,
    tok: &'a nerve_data::Tokenizer,
    train: &'a [(&'a str, i64)],
    test: &'a [(&'a str, i64)],
    batch: usize,
    steps_per_epoch: usize,
    seed: u64,
    /// The epoch whose order is drawn, and that order.
    order: Option<(usize, Vec<usize>)>,
    /// The adapters' configuration (`None`: full fine-tuning).
    lora: Option<LoraConfig>,
    meta: HashMap<String, String>,
    /// The latest held-out accuracy.
    last: Option<f64>,
}

impl Task for ClassifierFinetune<'_> {
    fn micro_step(&mut self, step: usize, _micro: usize, n: usize) -> Result<MicroBatch> {
        let (epoch, b) = (step / self.steps_per_epoch, step % self.steps_per_epoch);
        if !matches!(&self.order, Some((e, _)) if *e == epoch) {
            let mut gen = Generator::new(self.seed.wrapping_add(1 + epoch as u64));
            self.order = Some((epoch, gen.permutation(self.train.len())));
        }
        let (_, order) = self.order.as_ref().expect("drawn above");
        let rows = &order[b * self.batch..((b + 1) * self.batch).min(order.len())];
        let sentences: Vec<&str> = rows.iter().map(|&i| self.train[i].0).collect();
        let y = Tensor::from_vec(
            rows.iter().map(|&i| self.train[i].1).collect::<Vec<_>>(),
            [rows.len()],
        )?;
        let inputs = self.model.bert.tokenize(self.tok, &sentences)?;
        let logits = self.model.forward_inputs(&inputs)?;
        let l = loss::cross_entropy(&logits, &y, &Default::default())?;
        trainer::backward_mean(&l, n, 1.0)?;
        let pred: Vec<i64> = logits.argmax(-1, false)?.to_vec()?;
        let y: Vec<i64> = y.to_vec()?;
        Ok(MicroBatch {
            loss: l.item::<f32>()? as f64,
            samples: rows.len(),
            correct: Some(pred.iter().zip(&y).filter(|(p, t)| p == t).count()),
        })
    }

    fn micro_batches(&self, _step: usize) -> usize {
        1
    }

    fn evaluate(&mut self) -> Result<Vec<(&'static str, f64)>> {
        let (acc, loss) = classify_eval(self.model, self.tok, self.test, 64)?;
        self.last = Some(acc);
        Ok(vec![("val_loss", loss), ("val_accuracy", acc)])
    }

    fn epoch(&self, steps: usize) -> Option<f64> {
        Some(steps as f64 / self.steps_per_epoch as f64)
    }

    fn meta(&self) -> HashMap<String, String> {
        self.meta.clone()
    }

    /// The adapter as PEFT saves it and the head with the label names (`adapter/` and
    /// `classifier.safetensors`, or `best-…`); fully fine-tuned, the trainer's
    /// `model.safetensors` (with the labels in its metadata).
    fn export(&self, dir: &Path, prefix: &str) -> Result<bool> {
        let Some(c) = &self.lora else {
            return Ok(false);
        };
        lora::save(self.model, c, dir.join(format!("{prefix}adapter")))?;
        let head = vec![
            (
                "classifier.weight".to_string(),
                self.model.classifier.weight.clone(),
            ),
            (
                "classifier.bias".to_string(),
                self.model.classifier.bias.clone().context("head bias")?,
            ),
        ];
        let meta = HashMap::from([("labels".to_string(), self.meta["labels"].clone())]);
        save_safetensors(
            dir.join(format!("{prefix}classifier.safetensors")),
            &head,
            &meta,
        )?;
        Ok(true)
    }
}

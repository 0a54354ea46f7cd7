//! The training loop every `nerve train` model runs, and the run folder it writes:
//!
//! - `config.json`: the model, its resolved config, the data set and the `nerve train`
//!   arguments (what `--resume` continues with);
//! - `metrics.jsonl`: one JSON record per line (`kind` `train`, `eval`, `test` or
//!   `skipped`, with `step`, `epoch`, `time_s`, the loss, learning rate, gradient norm,
//!   throughput and validation metrics);
//! - `checkpoints/step-NNNNNNNN.safetensors`: everything a resumed run needs (model,
//!   optimizer, step, RNG state, best metric, early-stopping counter), one file each, the
//!   last `--keep-checkpoints` kept;
//! - `model.safetensors` (the latest weights) and `best.safetensors` (the best by
//!   `--monitor`), the files `nerve eval`, `generate` and `sample` read;
//! - `loss.png`, `accuracy.png`, `lr.png`.
//!
//! Every file is replaced atomically (temporary file, fsync, rename): a `kill -9` at any
//! moment leaves the previous checkpoint whole. Ctrl-C or SIGTERM finishes the step, saves
//! and exits; a non-finite loss or gradient stops the run (or skips the step) naming the
//! first offending parameter.

use std::collections::HashMap;
use std::io::{IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use indicatif::{ProgressBar, ProgressStyle};
use nerve_core::Tensor;
use nerve_distributed::DataParallel;

use crate::tensorboard::EventWriter;
use nerve_nn::checkpoint::{load_safetensors, save_safetensors, write_atomic};
use nerve_nn::{
    clip_grad_norm, first_nonfinite, grad_norm, LrSchedule, Module, ModuleExt, Optimizer,
};
use serde::{Deserialize, Serialize};
use serde_json::{json, Map, Value};

/// What one micro-batch's forward and backward gave.
pub struct MicroBatch {
    /// The mean loss over its samples (before any scaling for accumulation).
    pub loss: f64,
    /// Samples (tokens for language models) in it.
    pub samples: usize,
    /// Correctly classified samples (classifiers only).
    pub correct: Option<usize>,
}

/// The model-specific part of training: data, loss, evaluation, metadata.
pub trait Task {
    /// Forward and backward of micro-batch `micro` of the `n` of optimizer step `step` (the
    /// loss is divided by `n` before the backward pass, so gradients are the mean).
    fn micro_step(&mut self, step: usize, micro: usize, n: usize) -> Result<MicroBatch>;
    /// How many micro-batches optimizer step `step` has.
    fn micro_batches(&self, step: usize) -> usize;
    /// Validation metrics, each named `val_…`.
    fn evaluate(&mut self) -> Result<Vec<(&'static str, f64)>>;
    /// Epochs done after `steps` optimizer steps, where the data has epochs.
    fn epoch(&self, _steps: usize) -> Option<f64> {
        None
    }
    /// Called after every evaluation (a diffusion model draws a sample grid).
    fn after_eval(&mut self, _dir: &Path) -> Result<()> {
        Ok(())
    }
    /// Test metrics at the end of the run, each named `test_…` (classifiers with a test
    /// split).
    fn test(&mut self) -> Result<Vec<(&'static str, f64)>> {
        Ok(Vec::new())
    }
    /// At the end of the run: a text sample to show (language models), written to
    /// `samples.txt`.
    fn sample_text(&mut self) -> Result<Option<String>> {
        Ok(None)
    }
    /// The checkpoint metadata that rebuilds the model (`nerve.model`, `nerve.config`, …).
    fn meta(&self) -> HashMap<String, String>;
    /// The name of the throughput in records (`samples_per_s`, `tokens_per_s`).
    fn throughput_key(&self) -> &'static str {
        "samples_per_s"
    }
    /// Write the model's own files into the run folder `dir`, their names starting with
    /// `prefix` (`""` for the latest weights, `"best-"` for the best), and return `true`; or
    /// return `false` to have the trainer write `model.safetensors` / `best.safetensors`
    /// (the whole state dict and [`Task::meta`]).
    fn export(&self, _dir: &Path, _prefix: &str) -> Result<bool> {
        Ok(false)
    }
}

/// Backward of the loss of one of `n` micro-batches of a step (divided by `n`, so the step's
/// gradients are the mean over its micro-batches), times `shard_scale`, this rank's
/// [`Shard::loss_scale`](nerve_data::Shard::loss_scale) (1 in one process).
pub fn backward_mean(loss: &Tensor, n: usize, shard_scale: f64) -> Result<()> {
    if shard_scale != 1.0 {
        loss.mul_scalar(shard_scale / n as f64)?.backward()?;
    } else if n > 1 {
        loss.div_scalar(n as f64)?.backward()?;
    } else {
        loss.backward()?;
    }
    Ok(())
}

/// How much `nerve train` prints.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verbosity {
    /// A progress bar (plain progress lines when stderr is not a terminal) and a line per
    /// evaluation.
    Normal,
    /// Only the final result and errors.
    Quiet,
    /// Every metrics record as a JSON line on stdout, nothing else there.
    Json,
}

/// What to do when the loss or a gradient is not finite.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum, Serialize, Deserialize)]
pub enum OnNonFinite {
    /// Stop the run, keeping the last good checkpoint.
    Stop,
    /// Skip the step (parameters and optimizer unchanged); stop after 10 in a row.
    Skip,
}

/// Steps skipped in a row after which a `skip` run stops anyway.
const MAX_SKIPS_IN_A_ROW: usize = 10;

/// The options of a run folder, shared by `nerve train` and `nerve finetune`.
#[derive(clap::Args, Clone, Debug)]
pub struct RunOptions {
    /// Evaluate on the held-out data every this many optimizer steps, and at the end
    /// (default: once per epoch for classifiers, 250 steps for language models, 500 for ddpm;
    /// `nerve finetune`: 50 steps for language models, once per epoch for classifiers).
    #[arg(long)]
    pub eval_every: Option<usize>,
    /// Write a checkpoint every this many steps (default: at every evaluation), and at the
    /// end.
    #[arg(long)]
    pub checkpoint_every: Option<usize>,
    /// Step checkpoints kept in RUN/checkpoints (the newest).
    #[arg(long, default_value_t = 3)]
    pub keep_checkpoints: usize,
    /// Write a `train` record (loss, learning rate, gradient norm, throughput) to
    /// metrics.jsonl every this many steps.
    #[arg(long, default_value_t = 10)]
    pub log_every: usize,
    /// The metric that picks best.safetensors and drives --early-stopping: val_loss,
    /// val_accuracy (classifiers) or loss (the training loss).
    #[arg(long, default_value = "val_loss")]
    pub monitor: String,
    /// Stop when --monitor has not improved for this many evaluations.
    #[arg(long, value_name = "PATIENCE")]
    pub early_stopping: Option<usize>,
    /// The least change of --monitor that counts as an improvement.
    #[arg(long, default_value_t = 0.0)]
    pub min_delta: f64,
    /// On a NaN or infinite loss or gradient: stop (keeping the last good checkpoint) or
    /// skip the step.
    #[arg(long, value_enum, default_value_t = OnNonFinite::Stop)]
    pub on_nonfinite: OnNonFinite,
    /// Stop once this many optimizer steps are done, with a checkpoint, as if interrupted
    /// (continue with --resume).
    #[arg(long)]
    pub stop_after: Option<usize>,
    /// The run folder (default: runs/<model>-<data>; `nerve finetune`: runs/finetune-<model>).
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Continue the run in RUN (default: --out) from its newest checkpoint, with the
    /// arguments it was started with; arguments given here override them (e.g. more
    /// --epochs or --steps).
    #[arg(long, value_name = "RUN", num_args = 0..=1)]
    pub resume: Option<Option<PathBuf>>,
    /// No progress bar or progress lines.
    #[arg(long)]
    pub no_progress: bool,
    /// Print only the final result and errors.
    #[arg(long, conflicts_with = "json")]
    pub quiet: bool,
    /// Print every metrics record as a JSON line on stdout (and nothing else there).
    #[arg(long)]
    pub json: bool,
    /// The arguments of this run as its command takes them (stored in config.json for
    /// --resume).
    #[arg(skip)]
    pub command: Vec<String>,
    /// The number of ranks the run started with (from config.json when resuming).
    #[arg(skip)]
    pub started_world: Option<usize>,
    /// The command (`train`, `finetune`), for messages.
    #[arg(skip)]
    pub name: &'static str,
}

impl RunOptions {
    /// The loop settings for `steps` optimizer steps at learning rate `lr` with `schedule`
    /// (`eval_every` is the model's default unless given; gradients clipped to `clip`).
    pub fn settings(
        &self,
        steps: usize,
        eval_every: usize,
        clip: f64,
        lr: f64,
        schedule: LrSchedule,
    ) -> Result<Settings> {
        let eval_every = self.eval_every.unwrap_or(eval_every);
        let checkpoint_every = self.checkpoint_every.unwrap_or(eval_every);
        if eval_every == 0 || checkpoint_every == 0 || self.log_every == 0 {
            bail!("--eval-every, --checkpoint-every and --log-every must be at least 1");
        }
        if !["val_loss", "val_accuracy", "loss"].contains(&self.monitor.as_str()) {
            bail!(
                "--monitor {}: not val_loss, val_accuracy or loss",
                self.monitor
            );
        }
        Ok(Settings {
            steps,
            eval_every,
            checkpoint_every,
            keep: self.keep_checkpoints,
            log_every: self.log_every,
            clip,
            lr,
            schedule,
            monitor: self.monitor.clone(),
            patience: self.early_stopping,
            min_delta: self.min_delta,
            on_nonfinite: self.on_nonfinite,
            stop_after: self.stop_after,
            verbosity: self.verbosity(),
            progress: !self.no_progress,
            trainable_only: false,
            command: if self.name.is_empty() {
                "train"
            } else {
                self.name
            },
        })
    }

    /// `--json`, `--quiet` or neither.
    pub fn verbosity(&self) -> Verbosity {
        if self.json {
            Verbosity::Json
        } else if self.quiet {
            Verbosity::Quiet
        } else {
            Verbosity::Normal
        }
    }
}

/// The settings of the loop (from `nerve train`'s arguments).
pub struct Settings {
    /// Optimizer steps in the whole run.
    pub steps: usize,
    /// Evaluate every this many steps (and at the end).
    pub eval_every: usize,
    /// Write a checkpoint every this many steps (and at the end).
    pub checkpoint_every: usize,
    /// Step checkpoints kept.
    pub keep: usize,
    /// Write a `train` record every this many steps.
    pub log_every: usize,
    /// Clip gradients to this global norm (0: off).
    pub clip: f64,
    /// The base learning rate and its schedule over `steps`.
    pub lr: f64,
    /// The schedule.
    pub schedule: LrSchedule,
    /// The metric that picks the best checkpoint and drives early stopping.
    pub monitor: String,
    /// Stop after this many evaluations without improvement of `monitor`.
    pub patience: Option<usize>,
    /// The least change of `monitor` that counts as an improvement.
    pub min_delta: f64,
    /// On a non-finite loss or gradient.
    pub on_nonfinite: OnNonFinite,
    /// Stop (with a checkpoint) once this many steps are done, leaving the run resumable.
    pub stop_after: Option<usize>,
    /// Output.
    pub verbosity: Verbosity,
    /// A progress bar (terminal) or progress lines (otherwise).
    pub progress: bool,
    /// Checkpoints hold only the trainable parameters (fine-tuning: the frozen rest is
    /// rebuilt from the pretrained file).
    pub trainable_only: bool,
    /// The `nerve` command that resumes the run (`train`, `finetune`).
    pub command: &'static str,
}

/// A run stopped by a signal: `main` exits with status 128 + the signal number.
#[derive(Debug)]
pub struct Interrupted {
    /// The signal (SIGINT 2, SIGTERM 15).
    pub signal: usize,
}

impl std::fmt::Display for Interrupted {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "stopped by signal {}", self.signal)
    }
}

impl std::error::Error for Interrupted {}

/// The loop's state between steps, saved in every checkpoint.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
struct State {
    /// Optimizer steps done.
    step: usize,
    /// Seconds of training before this process (resumed runs add up).
    time_s: f64,
    /// The best value of the monitored metric and its step.
    best: Option<(f64, usize)>,
    /// Evaluations since the best.
    since_best: usize,
    /// Steps skipped in a row (non-finite, `--on-nonfinite skip`).
    skips: usize,
    /// Sums since the last `train` record.
    log: Sums,
    /// Sums since the last evaluation (the train loss shown next to it).
    eval: Sums,
}

/// Running sums of losses, samples and correct predictions.
#[derive(Clone, Copy, Debug, Default, Serialize, Deserialize)]
struct Sums {
    loss: f64,
    micro: usize,
    steps: usize,
    samples: usize,
    correct: Option<usize>,
    grad_norm: f64,
    seconds: f64,
    /// Seconds in the gradient all-reduce (data-parallel runs).
    #[serde(default)]
    allreduce_seconds: f64,
}

impl Sums {
    fn add(&mut self, m: &MicroBatch) {
        self.loss += m.loss;
        self.micro += 1;
        self.samples += m.samples;
        if let Some(c) = m.correct {
            *self.correct.get_or_insert(0) += c;
        }
    }
    fn mean_loss(&self) -> f64 {
        self.loss / self.micro.max(1) as f64
    }
    fn accuracy(&self) -> Option<f64> {
        self.correct.map(|c| c as f64 / self.samples.max(1) as f64)
    }
}

/// The files of a run folder.
pub struct RunDir {
    /// The folder.
    pub dir: PathBuf,
}

impl RunDir {
    /// The run folder `dir`.
    pub fn new(dir: &Path) -> Self {
        Self { dir: dir.into() }
    }
    /// `config.json`.
    pub fn config(&self) -> PathBuf {
        self.dir.join("config.json")
    }
    /// `metrics.jsonl`.
    pub fn metrics(&self) -> PathBuf {
        self.dir.join("metrics.jsonl")
    }
    /// `model.safetensors`: the latest weights.
    pub fn model(&self) -> PathBuf {
        self.dir.join("model.safetensors")
    }
    /// `best.safetensors`: the best weights by the monitored metric.
    pub fn best(&self) -> PathBuf {
        self.dir.join("best.safetensors")
    }
    fn checkpoints(&self) -> PathBuf {
        self.dir.join("checkpoints")
    }
    fn checkpoint(&self, step: usize) -> PathBuf {
        self.checkpoints()
            .join(format!("step-{step:08}.safetensors"))
    }
    /// The step checkpoints present, oldest first.
    pub fn step_checkpoints(&self) -> Vec<(usize, PathBuf)> {
        let Ok(rd) = std::fs::read_dir(self.checkpoints()) else {
            return Vec::new();
        };
        let mut v: Vec<(usize, PathBuf)> = rd
            .flatten()
            .filter_map(|e| {
                let name = e.file_name().into_string().ok()?;
                let step = name
                    .strip_prefix("step-")?
                    .strip_suffix(".safetensors")?
                    .parse()
                    .ok()?;
                Some((step, e.path()))
            })
            .collect();
        v.sort();
        v
    }
    /// Remove temporary files that an interrupted write left.
    fn remove_temporaries(&self) {
        for dir in [self.dir.clone(), self.checkpoints()] {
            for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
                if e.file_name().to_string_lossy().contains(".tmp") {
                    let _ = std::fs::remove_file(e.path());
                }
            }
        }
    }
}

/// The step of a record.
fn record_step(r: &Map<String, Value>) -> usize {
    r.get("step").and_then(Value::as_u64).unwrap_or(0) as usize
}

/// Output: a progress bar or plain progress lines, evaluation lines, JSON records.
struct Out {
    verbosity: Verbosity,
    bar: Option<ProgressBar>,
    /// Print a plain progress line every this many steps (no terminal), else 0.
    plain_every: usize,
}

impl Out {
    fn new(verbosity: Verbosity, progress: bool, start: usize, total: usize) -> Self {
        let terminal = std::io::stderr().is_terminal();
        let show = verbosity == Verbosity::Normal && progress;
        let bar = (show && terminal).then(|| {
            let pb = ProgressBar::new(total as u64);
            pb.set_style(
                ProgressStyle::with_template("step {pos}/{len} [{bar:30}] {msg} ETA {eta}")
                    .expect("valid template")
                    .progress_chars("=> "),
            );
            pb.set_position(start as u64);
            pb.reset_eta();
            pb
        });
        let plain_every = if show && !terminal {
            (total / 20).max(1)
        } else {
            0
        };
        Self {
            verbosity,
            bar,
            plain_every,
        }
    }
    /// A line for people (Normal only).
    fn info(&self, line: &str) {
        if self.verbosity == Verbosity::Normal {
            match &self.bar {
                Some(pb) => pb.println(line),
                None => println!("{line}"),
            }
        }
    }
    /// A metrics record (printed in JSON mode).
    fn record(&self, r: &Map<String, Value>) {
        if self.verbosity == Verbosity::Json {
            println!("{}", Value::Object(r.clone()));
        }
    }
    fn finish(&self) {
        if let Some(pb) = &self.bar {
            pb.finish_and_clear();
        }
    }
}

/// Ctrl-C and SIGTERM: the first sets a flag the loop checks after each step; a second
/// Ctrl-C ends the process at once.
struct Signals {
    which: Arc<AtomicUsize>,
}

impl Signals {
    fn install() -> Result<Self> {
        use signal_hook::consts::{SIGINT, SIGTERM};
        let which = Arc::new(AtomicUsize::new(0));
        let pressed = Arc::new(AtomicBool::new(false));
        for sig in [SIGINT, SIGTERM] {
            // Order matters: the shutdown check runs before the flag is set by this signal.
            signal_hook::flag::register_conditional_shutdown(sig, 128 + sig, Arc::clone(&pressed))
                .context("installing the signal handlers")?;
            signal_hook::flag::register(sig, Arc::clone(&pressed))
                .context("installing the signal handlers")?;
            signal_hook::flag::register_usize(sig, Arc::clone(&which), sig as usize)
                .context("installing the signal handlers")?;
        }
        Ok(Self { which })
    }
    fn received(&self) -> Option<usize> {
        match self.which.load(Ordering::SeqCst) {
            0 => None,
            s => Some(s),
        }
    }
}

/// The training loop over one model and optimizer.
pub struct Trainer<'a> {
    net: &'a dyn Module,
    opt: Box<dyn Optimizer + 'a>,
    run: RunDir,
    set: Settings,
    state: State,
    records: Vec<Map<String, Value>>,
    metrics_file: Option<std::fs::File>,
    /// The TensorBoard event file (made with the first record; `None` after a failure).
    events: Option<Option<EventWriter>>,
    /// The process group: gradients are averaged over its ranks; only rank 0 writes.
    dp: &'a DataParallel,
}

impl<'a> Trainer<'a> {
    /// A trainer writing into `dir`; `resume` continues from its newest checkpoint.
    pub fn new(
        net: &'a dyn Module,
        opt: Box<dyn Optimizer + 'a>,
        dir: &Path,
        mut set: Settings,
        dp: &'a DataParallel,
    ) -> Self {
        if !dp.is_main() {
            set.verbosity = Verbosity::Quiet;
            set.progress = false;
        }
        Self {
            net,
            opt,
            run: RunDir::new(dir),
            set,
            state: State::default(),
            records: Vec::new(),
            metrics_file: None,
            events: None,
            dp,
        }
    }

    /// Whether this process writes the run folder and prints (rank 0).
    fn main(&self) -> bool {
        self.dp.is_main()
    }

    /// The step to start from.
    pub fn step(&self) -> usize {
        self.state.step
    }

    /// Load the newest checkpoint that reads back (an older one if the newest is damaged),
    /// restoring model, optimizer, RNG and loop state, and cut `metrics.jsonl` back to its
    /// step. `meta_check` can refuse a checkpoint of another model or data set.
    pub fn resume(
        &mut self,
        meta_check: impl Fn(&HashMap<String, String>, &Path) -> Result<()>,
    ) -> Result<()> {
        if self.main() {
            // (Only rank 0 writes the folder: another rank would delete its files in flight.)
            self.run.remove_temporaries();
        }
        let cks = self.run.step_checkpoints();
        if cks.is_empty() {
            bail!(
                "{}: no checkpoint to resume from (none in {})",
                self.run.dir.display(),
                self.run.checkpoints().display()
            );
        }
        let mut last_err = None;
        for (_, path) in cks.iter().rev() {
            match self.load_checkpoint(path, &meta_check) {
                Ok(()) => {
                    last_err = None;
                    break;
                }
                Err(e) => {
                    eprintln!("warning: {e:#}; trying an older checkpoint");
                    last_err = Some(e);
                }
            }
        }
        if let Some(e) = last_err {
            return Err(e.context("no checkpoint of the run could be loaded"));
        }
        if !self.main() {
            return Ok(());
        }
        let step = self.state.step;
        let mut records = if self.run.metrics().exists() {
            crate::plot::read_metrics(&self.run.metrics())?
        } else {
            Vec::new()
        };
        records.retain(|r| record_step(r) <= step);
        let text: String = records
            .iter()
            .map(|r| format!("{}\n", Value::Object(r.clone())))
            .collect();
        write_atomic(&self.run.metrics(), text.as_bytes())?;
        // TensorBoard's files start again from the records kept.
        remove_event_files(&self.run.dir);
        for r in &records {
            self.tensorboard(r);
        }
        self.records = records;
        Ok(())
    }

    fn load_checkpoint(
        &mut self,
        path: &Path,
        meta_check: &impl Fn(&HashMap<String, String>, &Path) -> Result<()>,
    ) -> Result<()> {
        let (tensors, meta) = load_safetensors(path)?;
        meta_check(&meta, path)?;
        let get = |k: &str| {
            meta.get(k)
                .with_context(|| format!("{}: no `{k}` in its metadata", path.display()))
        };
        let state: State = serde_json::from_str(get("nerve.trainer")?)
            .with_context(|| format!("{}: bad nerve.trainer", path.display()))?;
        let rng: u128 = get("nerve.rng")?
            .parse()
            .with_context(|| format!("{}: bad nerve.rng", path.display()))?;
        let lr: f64 = get("nerve.lr")?
            .parse()
            .with_context(|| format!("{}: bad nerve.lr", path.display()))?;
        let (mut model, mut optim) = (HashMap::new(), HashMap::new());
        for (name, t) in tensors {
            if let Some(n) = name.strip_prefix("model/") {
                model.insert(n.to_string(), t);
            } else if let Some(n) = name.strip_prefix("optimizer/") {
                optim.insert(n.to_string(), t);
            } else {
                bail!("{}: unexpected tensor `{name}`", path.display());
            }
        }
        if self.set.trainable_only {
            // Only the trained parameters: the rest comes from the pretrained model.
            if let Some((name, _)) = self
                .net
                .named_parameters()
                .into_iter()
                .find(|(n, t)| t.requires_grad() && !model.contains_key(n))
            {
                bail!(
                    "{}: no `model/{name}`, which this run trains",
                    path.display()
                );
            }
        }
        self.net
            .load_state_dict(&model, !self.set.trainable_only)
            .with_context(|| format!("{}: the model", path.display()))?;
        self.opt
            .load_state_dict(&optim)
            .with_context(|| format!("{}: the optimizer state", path.display()))?;
        self.opt.set_lr(lr);
        nerve_core::set_rng_state(rng);
        self.state = state;
        Ok(())
    }

    /// Write the step checkpoint (then `model.safetensors`), and drop the oldest beyond
    /// `--keep-checkpoints`. Returns its path.
    fn save_checkpoint(&self, task: &dyn Task) -> Result<PathBuf> {
        let step = self.state.step;
        if !self.main() {
            return Ok(self.run.checkpoint(step));
        }
        let mut meta = task.meta();
        meta.insert("nerve.step".into(), step.to_string());
        let model = if self.set.trainable_only {
            self.net
                .named_parameters()
                .into_iter()
                .filter(|(_, t)| t.requires_grad())
                .collect()
        } else {
            self.net.state_dict()
        };
        let mut tensors: Vec<(String, Tensor)> = model
            .into_iter()
            .map(|(n, t)| (format!("model/{n}"), t))
            .collect();
        tensors.extend(
            self.opt
                .state_dict()
                .into_iter()
                .map(|(n, t)| (format!("optimizer/{n}"), t)),
        );
        let mut full = meta.clone();
        full.insert("nerve.trainer".into(), serde_json::to_string(&self.state)?);
        full.insert("nerve.rng".into(), nerve_core::rng_state().to_string());
        full.insert("nerve.lr".into(), self.opt.lr().to_string());
        let path = self.run.checkpoint(step);
        save_safetensors(&path, &tensors, &full)?;
        if !task.export(&self.run.dir, "")? {
            save_safetensors(self.run.model(), &self.net.state_dict(), &meta)?;
        }
        let cks = self.run.step_checkpoints();
        let extra = cks.len().saturating_sub(self.set.keep.max(1));
        for (_, old) in cks.iter().take(extra) {
            if *old != path {
                let _ = std::fs::remove_file(old);
            }
        }
        Ok(path)
    }

    /// Append a record to `metrics.jsonl` (and print it in JSON mode).
    fn push_record(&mut self, out: &Out, mut r: Map<String, Value>, task: &dyn Task) -> Result<()> {
        if !self.main() {
            return Ok(());
        }
        let step = self.state.step;
        r.insert("step".into(), json!(step));
        if let Some(e) = task.epoch(step) {
            r.insert("epoch".into(), json!(e));
        }
        r.insert("time_s".into(), json!(self.state.time_s));
        if self.metrics_file.is_none() {
            let f = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(self.run.metrics())
                .with_context(|| format!("opening {}", self.run.metrics().display()))?;
            self.metrics_file = Some(f);
        }
        if let Some(f) = &mut self.metrics_file {
            writeln!(f, "{}", Value::Object(r.clone()))
                .with_context(|| format!("writing {}", self.run.metrics().display()))?;
        }
        out.record(&r);
        self.tensorboard(&r);
        self.records.push(r);
        Ok(())
    }

    /// Add the numbers of record `r` to the TensorBoard event file as `<kind>/<name>`
    /// (`train/loss`, `eval/val_accuracy`). A failure is a warning: the metrics are in
    /// metrics.jsonl anyway.
    fn tensorboard(&mut self, r: &Map<String, Value>) {
        let dir = &self.run.dir;
        let Some(w) = self
            .events
            .get_or_insert_with(|| match EventWriter::create(dir) {
                Ok(w) => Some(w),
                Err(e) => {
                    eprintln!("warning: no TensorBoard events: {e:#}");
                    None
                }
            })
        else {
            return;
        };
        let kind = r.get("kind").and_then(Value::as_str).unwrap_or("train");
        let step = record_step(r) as i64;
        for (k, v) in r {
            if ["step", "epoch", "time_s", "kind"].contains(&k.as_str()) {
                continue;
            }
            if let Some(v) = v.as_f64() {
                if let Err(e) = w.add_scalar(&format!("{kind}/{k}"), v, step) {
                    eprintln!("warning: TensorBoard events stopped: {e:#}");
                    self.events = Some(None);
                    return;
                }
            }
        }
    }

    /// Whether `value` of the monitored metric improves on the best so far.
    fn improves(&self, value: f64) -> bool {
        let maximise = self.set.monitor.contains("accuracy");
        match self.state.best {
            None => value.is_finite(),
            Some((best, _)) if maximise => value > best + self.set.min_delta,
            Some((best, _)) => value < best - self.set.min_delta,
        }
    }

    /// Run the loop from the current step to the end (or an early stop, a `--stop-after`,
    /// a signal, a non-finite step).
    pub fn fit(&mut self, task: &mut dyn Task) -> Result<()> {
        let total = self.set.steps;
        let out = Out::new(
            self.set.verbosity,
            self.set.progress,
            self.state.step,
            total,
        );
        self.net.train();
        if self.state.step >= total {
            out.info(&format!(
                "the run is complete ({} of {total} steps); nothing to do",
                self.state.step
            ));
            return Ok(());
        }
        let signals = Signals::install()?;
        // Every rank starts from rank 0's parameters (as DDP's constructor makes them).
        self.dp.broadcast_parameters(&self.net.parameters())?;
        let named = self.net.named_parameters();
        let start_step = self.state.step;
        let t_start = Instant::now();
        let time0 = self.state.time_s;
        let mut t_log = Instant::now();
        let mut stop_reason: Option<String> = None;
        let mut stopped_by = None;
        while self.state.step < total {
            let s = self.state.step;
            self.opt.set_lr(self.set.schedule.lr(self.set.lr, s));
            let n = task.micro_batches(s).max(1);
            let mut loss = 0.0;
            let mut batches = Vec::with_capacity(n);
            for micro in 0..n {
                let m = task.micro_step(s, micro, n)?;
                loss += m.loss / n as f64;
                batches.push(m);
            }
            // With several ranks: the mean gradient, the whole batches' statistics, and a
            // signal seen by any rank, so that every rank takes the same decisions.
            let mut signal = None;
            if self.dp.size() > 1 {
                let t = Instant::now();
                self.dp.all_reduce_gradients(self.opt.params())?;
                self.state.log.allreduce_seconds += t.elapsed().as_secs_f64();
                signal = self.agree_on_step(&mut batches, signals.received());
                loss = batches.iter().map(|m| m.loss / n as f64).sum();
            }
            let norm = if self.set.clip > 0.0 {
                clip_grad_norm(self.opt.params(), self.set.clip)?
            } else {
                grad_norm(self.opt.params())?
            };
            let step_s = t_log.elapsed().as_secs_f64();
            if !(loss.is_finite() && norm.is_finite()) {
                let culprit = first_nonfinite(&named).map_or_else(
                    || "every parameter and gradient is finite".to_string(),
                    |c| c.to_string(),
                );
                let what = format!(
                    "step {}: the loss is {loss} and the gradient norm {norm}; {culprit}",
                    s + 1
                );
                self.opt.zero_grad();
                if self.set.on_nonfinite == OnNonFinite::Stop
                    || self.state.skips + 1 >= MAX_SKIPS_IN_A_ROW
                {
                    out.finish();
                    let last = self.run.step_checkpoints().pop().map_or_else(
                        || "no checkpoint was written yet".to_string(),
                        |(k, p)| format!("the last good checkpoint is {} (step {k})", p.display()),
                    );
                    let hint = if self.set.on_nonfinite == OnNonFinite::Skip {
                        format!(" ({MAX_SKIPS_IN_A_ROW} steps in a row were not finite)")
                    } else {
                        String::new()
                    };
                    bail!("{what}. Training stopped{hint}; {last}. Try a lower --lr or --clip-grad-norm, or --on-nonfinite skip");
                }
                if self.main() {
                    eprintln!("warning: {what}; the step is skipped");
                }
                self.state.skips += 1;
                self.state.step += 1;
                let r = Map::from_iter([
                    ("kind".to_string(), json!("skipped")),
                    ("loss".to_string(), json!(loss.to_string())),
                    ("reason".to_string(), json!(culprit)),
                ]);
                self.push_record(&out, r, task)?;
                continue;
            }
            self.state.skips = 0;
            self.opt.step()?;
            self.opt.zero_grad();
            self.state.step += 1;
            let step = self.state.step;
            self.state.time_s = time0 + t_start.elapsed().as_secs_f64();
            for sums in [&mut self.state.log, &mut self.state.eval] {
                for m in &batches {
                    sums.add(m);
                }
                sums.steps += 1;
                sums.grad_norm = norm;
            }
            self.state.log.seconds += step_s;
            self.state.eval.seconds += step_s;
            t_log = Instant::now();
            let throughput = |sums: &Sums| sums.samples as f64 / sums.seconds.max(1e-9);
            if let Some(pb) = &out.bar {
                pb.set_position(step as u64);
                pb.set_message(format!(
                    "loss {:.4} {:.0} {}",
                    self.state.eval.mean_loss(),
                    throughput(&self.state.eval),
                    task.throughput_key().replace("_per_s", "/s")
                ));
            }
            if out.plain_every > 0 && (step.is_multiple_of(out.plain_every) || step == total) {
                let done = step as f64 / total as f64;
                let secs = t_start.elapsed().as_secs_f64();
                let eta = secs / (step - start_step).max(1) as f64 * (total - step) as f64;
                eprintln!(
                    "step {step}/{total} ({:.0}%) loss {:.4} lr {:.2e} {:.0} {} ETA {}",
                    100.0 * done,
                    self.state.eval.mean_loss(),
                    self.opt.lr(),
                    throughput(&self.state.eval),
                    task.throughput_key().replace("_per_s", "/s"),
                    format_secs(eta)
                );
            }
            if step.is_multiple_of(self.set.log_every) || step == total {
                let l = self.state.log;
                let mut r = Map::from_iter([
                    ("kind".to_string(), json!("train")),
                    ("loss".to_string(), json!(l.mean_loss())),
                    ("lr".to_string(), json!(self.opt.lr())),
                    ("grad_norm".to_string(), json!(l.grad_norm)),
                    (task.throughput_key().to_string(), json!(throughput(&l))),
                ]);
                if let Some(a) = l.accuracy() {
                    r.insert("accuracy".into(), json!(a));
                }
                if self.dp.size() > 1 {
                    let ms = 1e3 * l.allreduce_seconds / l.steps.max(1) as f64;
                    r.insert("allreduce_ms".into(), json!(ms));
                }
                self.push_record(&out, r, task)?;
                self.state.log = Sums::default();
            }
            let mut checkpoint = step.is_multiple_of(self.set.checkpoint_every) || step == total;
            if step.is_multiple_of(self.set.eval_every) || step == total {
                let metrics = task.evaluate()?;
                self.net.train();
                let e = self.state.eval;
                let mut line = format!("step {step:>6}/{total}");
                if let Some(ep) = task.epoch(step) {
                    line.push_str(&format!("  epoch {ep:.2}"));
                }
                line.push_str(&format!("  train loss {:.4}", e.mean_loss()));
                if let Some(a) = e.accuracy() {
                    line.push_str(&format!(" acc {:.2}%", 100.0 * a));
                }
                let mut r = Map::from_iter([("kind".to_string(), json!("eval"))]);
                for (k, v) in &metrics {
                    r.insert(k.to_string(), json!(v));
                    line.push_str(&format!("  {}", format_metric(k, *v)));
                }
                line.push_str(&format!(
                    "  lr {:.2e}  {:.0} {}  {:.0}s",
                    self.opt.lr(),
                    throughput(&e),
                    task.throughput_key().replace("_per_s", "/s"),
                    self.state.time_s
                ));
                out.info(&line);
                self.push_record(&out, r, task)?;
                self.state.eval = Sums::default();
                let monitored = metrics
                    .iter()
                    .find(|(k, _)| *k == self.set.monitor)
                    .map(|(_, v)| *v)
                    .or((self.set.monitor == "loss").then(|| e.mean_loss()));
                let Some(value) = monitored else {
                    bail!(
                        "--monitor {}: this model's evaluation gives {}",
                        self.set.monitor,
                        metrics
                            .iter()
                            .map(|(k, _)| *k)
                            .chain(["loss"])
                            .collect::<Vec<_>>()
                            .join(", ")
                    );
                };
                if self.improves(value) {
                    self.state.best = Some((value, step));
                    self.state.since_best = 0;
                    let mut meta = task.meta();
                    meta.insert("nerve.step".into(), step.to_string());
                    meta.insert(format!("nerve.{}", self.set.monitor), value.to_string());
                    if self.main() && !task.export(&self.run.dir, "best-")? {
                        save_safetensors(self.run.best(), &self.net.state_dict(), &meta)?;
                    }
                } else {
                    self.state.since_best += 1;
                    if let (Some(p), Some((best, at))) = (self.set.patience, self.state.best) {
                        if self.state.since_best >= p {
                            stop_reason = Some(format!(
                                "early stopping: {} has not improved for {p} evaluations (best {best:.4} at step {at})",
                                self.set.monitor
                            ));
                        }
                    }
                }
                if self.main() {
                    task.after_eval(&self.run.dir)?;
                }
                self.write_plots();
                checkpoint = true;
                if self.dp.size() > 1 {
                    // Early stopping on one rank stops them all.
                    let mut stop = [f64::from(u8::from(stop_reason.is_some()))];
                    self.dp.all_reduce_sum(&mut stop);
                    if stop[0] > 0.0 && stop_reason.is_none() {
                        stop_reason = Some("early stopping on another rank".into());
                    }
                }
            }
            if self.dp.size() == 1 {
                signal = signals.received();
            }
            if let Some(sig) = signal {
                stopped_by = Some(sig);
                stop_reason = Some(format!("interrupted by signal {sig}"));
            }
            if self.set.stop_after.is_some_and(|k| step >= k) && step < total {
                stop_reason = Some(format!("stopped after step {step} (--stop-after)"));
            }
            if checkpoint || stop_reason.is_some() {
                self.save_checkpoint(task)?;
            }
            if stop_reason.is_some() {
                break;
            }
        }
        out.finish();
        if let Some(reason) = &stop_reason {
            if self.state.step < total && !reason.starts_with("early") {
                let msg = format!(
                    "{reason}; checkpoint {} — continue with `nerve {} --resume {}`",
                    self.run.checkpoint(self.state.step).display(),
                    self.set.command,
                    self.run.dir.display()
                );
                if !self.main() {
                } else if self.set.verbosity == Verbosity::Json {
                    eprintln!("{msg}");
                } else {
                    println!("{msg}");
                }
                if let Some(sig) = stopped_by {
                    return Err(Interrupted { signal: sig }.into());
                }
                return Ok(());
            }
            out.info(reason);
        }
        let test = task.test()?;
        if !test.is_empty() {
            let mut r = Map::from_iter([("kind".to_string(), json!("test"))]);
            let mut line = String::from("test");
            for (k, v) in &test {
                r.insert(k.to_string(), json!(v));
                line.push_str(&format!("  {}", format_metric(k, *v)));
            }
            self.push_record(&out, r, task)?;
            if self.set.verbosity != Verbosity::Json && self.main() {
                println!("{line}");
            }
        }
        self.write_plots();
        if !self.main() {
            return Ok(());
        }
        if let Some(text) = task.sample_text()? {
            write_atomic(&self.run.dir.join("samples.txt"), text.as_bytes())?;
            out.info(&format!("sample:\n{text}"));
        }
        if self.set.verbosity != Verbosity::Json {
            let best = self.state.best.map_or(String::new(), |(v, at)| {
                // A task that exports its own files (adapters) has no best.safetensors.
                let file = Some(self.run.best())
                    .filter(|f| f.is_file())
                    .map_or(String::new(), |f| format!(" ({})", f.display()));
                format!(
                    "; best {} {} at step {at}{file}",
                    self.set.monitor,
                    format_metric("", v).trim(),
                )
            });
            println!(
                "done: {} steps in {:.0}s{best}; run folder {}",
                self.state.step,
                self.state.time_s,
                self.run.dir.display()
            );
        }
        Ok(())
    }

    /// Sum the micro-batches' statistics over the ranks (each `loss` becomes the mean over
    /// the whole batch, `samples` and `correct` the totals) and the signals the ranks have
    /// received; returns the signal any rank got (SIGINT before SIGTERM).
    fn agree_on_step(&self, batches: &mut [MicroBatch], signal: Option<usize>) -> Option<usize> {
        let mut v: Vec<f64> = batches
            .iter()
            .flat_map(|m| {
                let s = m.samples as f64;
                [m.loss * s, s, m.correct.unwrap_or(0) as f64]
            })
            .collect();
        v.push(f64::from(u8::from(signal == Some(2))));
        v.push(f64::from(u8::from(signal.is_some_and(|s| s != 2))));
        self.dp.all_reduce_sum(&mut v);
        for (m, s) in batches.iter_mut().zip(v.chunks_exact(3)) {
            m.loss = s[0] / s[1].max(1.0);
            m.samples = s[1] as usize;
            m.correct = m.correct.map(|_| s[2] as usize);
        }
        let k = 3 * batches.len();
        if v[k] > 0.0 {
            Some(2)
        } else if v[k + 1] > 0.0 {
            Some(15)
        } else {
            None
        }
    }

    /// Plots of the metrics so far (a failure to draw is a warning, not a stop).
    fn write_plots(&self) {
        if !self.main() {
            return;
        }
        if let Err(e) = crate::plot::write_plots(&self.run.dir, &self.records) {
            eprintln!("warning: plots not written: {e:#}");
        }
    }
}

/// `val_accuracy 97.12%` or `val_loss 0.1234`.
fn format_metric(name: &str, v: f64) -> String {
    let label = name.replace('_', " ");
    if name.contains("accuracy") {
        format!("{label} {:.2}%", 100.0 * v)
    } else {
        format!("{label} {v:.4}")
    }
}

/// `1h02m`, `3m20s`, `12s`.
fn format_secs(s: f64) -> String {
    let s = s.max(0.0).round() as u64;
    match s {
        0..=59 => format!("{s}s"),
        60..=3599 => format!("{}m{:02}s", s / 60, s % 60),
        _ => format!("{}h{:02}m", s / 3600, s % 3600 / 60),
    }
}

/// Delete the TensorBoard event files of `dir`.
fn remove_event_files(dir: &Path) {
    for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        if e.file_name()
            .to_string_lossy()
            .starts_with("events.out.tfevents.")
        {
            let _ = std::fs::remove_file(e.path());
        }
    }
}

/// Files of an earlier run that a fresh run in the same folder replaces.
const RUN_FILES: &[&str] = &[
    "metrics.jsonl",
    "model.safetensors",
    "best.safetensors",
    "loss.png",
    "accuracy.png",
    "lr.png",
    "samples.txt",
    "samples.png",
    "report.md",
    "report.html",
];

/// Set up the run folder (`run.out`) for training `net` with `opt` over the ranks of `dp`:
/// resume it (`--resume`, checking that the checkpoint's `meta` matches this model and data)
/// or start afresh (replacing an earlier run's files); then write `config.json`. Only rank 0
/// touches the folder.
pub fn start<'a>(
    run: &RunOptions,
    net: &'a dyn Module,
    opt: Box<dyn Optimizer + 'a>,
    set: Settings,
    config: &Value,
    meta: &HashMap<String, String>,
    dp: &'a DataParallel,
) -> Result<Trainer<'a>> {
    let out = &run.out.clone().context("the run folder was not resolved")?;
    let mut t = Trainer::new(net, opt, out, set, dp);
    if run.resume.is_some() {
        t.resume(|found, path| {
            for (k, v) in meta {
                let f = found.get(k).map_or("(missing)", String::as_str);
                if f != v {
                    bail!(
                        "{}: `{k}` is {f}, but this run's is {v}; it is another model or data set",
                        path.display()
                    );
                }
            }
            Ok(())
        })?;
        if t.set.verbosity == Verbosity::Normal {
            println!(
                "resuming {} from step {} of {}",
                out.display(),
                t.step(),
                t.set.steps
            );
        }
    } else if dp.is_main() {
        let old = t.run.step_checkpoints();
        if !old.is_empty() || t.run.metrics().exists() {
            if t.set.verbosity == Verbosity::Normal {
                println!(
                    "replacing the earlier run in {} (continue a run with --resume instead)",
                    out.display()
                );
            }
            for (_, p) in old {
                std::fs::remove_file(&p).with_context(|| format!("removing {}", p.display()))?;
            }
            for f in RUN_FILES {
                let _ = std::fs::remove_file(out.join(f));
            }
            remove_event_files(out);
        }
        std::fs::create_dir_all(out).with_context(|| format!("creating {}", out.display()))?;
    }
    if !dp.is_main() {
        return Ok(t);
    }
    if dp.size() > 1 && t.set.verbosity == Verbosity::Normal {
        let params = t.opt.params();
        println!(
            "data parallel over {} ranks ({}): each step all-reduces {:.2} MB of gradients in {} bucket(s) of up to {} MiB",
            dp.size(),
            dp.group().name(),
            DataParallel::gradient_bytes(params) as f64 / 1e6,
            dp.bucket_count(params),
            DataParallel::DEFAULT_BUCKET_MB
        );
    }
    let cfg = json!({
        "model": meta.get("nerve.model"),
        "data": meta.get("nerve.data"),
        "config": config,
        "command": run.command,
        "world_size": run.started_world.unwrap_or(dp.size()),
    });
    write_atomic(
        &t.run.config(),
        serde_json::to_string_pretty(&cfg)?.as_bytes(),
    )?;
    Ok(t)
}

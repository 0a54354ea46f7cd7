//! The files of a run trained by steps (language models, diffusion): model, optimizer and
//! metrics, tagged with the step, saved atomically and resumed together.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use nerve_nn::checkpoint::write_atomic;
use nerve_nn::{load_model, load_optimizer, save_model, save_optimizer, Module, Optimizer};

use crate::meta_get;

/// `model.safetensors`, `optimizer.safetensors` and `metrics.csv` of one run folder.
pub struct StepRun {
    /// The model checkpoint.
    pub model_file: PathBuf,
    opt_file: PathBuf,
    metrics_file: PathBuf,
    /// The metrics so far (CSV with its header).
    pub metrics: String,
}

impl StepRun {
    /// The files in `out`, with fresh metrics starting with `header`.
    pub fn new(out: &Path, header: &str) -> Self {
        Self {
            model_file: out.join("model.safetensors"),
            opt_file: out.join("optimizer.safetensors"),
            metrics_file: out.join("metrics.csv"),
            metrics: format!("{header}\n"),
        }
    }

    /// Load the model and optimizer of an interrupted run (checking that both carry the same
    /// step) and its metrics; returns the step and the model's metadata.
    pub fn resume(
        &mut self,
        net: &dyn Module,
        opt: &mut dyn Optimizer,
    ) -> Result<(usize, HashMap<String, String>)> {
        let meta = load_model(net, &self.model_file)?;
        let ometa = load_optimizer(opt, &self.opt_file)?;
        let step = meta_get(&meta, "nerve.step", &self.model_file)?;
        if ometa.get("nerve.step").map(String::as_str) != Some(step) {
            bail!(
                "{} (step {step}) and {} are from different steps; the run was interrupted while saving",
                self.model_file.display(),
                self.opt_file.display()
            );
        }
        let start = step
            .parse()
            .with_context(|| format!("{}: bad nerve.step", self.model_file.display()))?;
        if let Ok(m) = std::fs::read_to_string(&self.metrics_file) {
            self.metrics = m;
        }
        println!("resuming {} from step {start}", self.model_file.display());
        Ok((start, meta))
    }

    /// Save the run at `step`: the optimizer first, the model (with `meta` and the step) last,
    /// so an interruption in between leaves files of two steps, which [`StepRun::resume`]
    /// detects by their step tags.
    pub fn save(
        &self,
        net: &dyn Module,
        opt: &dyn Optimizer,
        step: usize,
        mut meta: HashMap<String, String>,
    ) -> Result<()> {
        meta.insert("nerve.step".into(), step.to_string());
        let ometa = HashMap::from([("nerve.step".to_string(), step.to_string())]);
        save_optimizer(opt, &self.opt_file, &ometa)?;
        write_atomic(&self.metrics_file, self.metrics.as_bytes())?;
        save_model(net, &self.model_file, &meta)?;
        Ok(())
    }
}

//! Diffusion on the command line: `nerve train --model ddpm` (a class-conditional U-Net on
//! 28×28 images) and `nerve sample` (DDIM or DDPM sampling into a PNG grid, optionally scored
//! by a trained classifier).

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, Context, Result};
use nerve_core::{no_grad, Generator, Tensor};
use nerve_data::image::save_png_grid;
use nerve_data::{Batches, DataLoader, Dataset, Shard};
use nerve_distributed::DataParallel;
use nerve_models::ddpm::{ddpm_loss, sample_ddim, sample_ddpm, DdpmSchedule, SampleOptions};
use nerve_models::{UNet, UNetConfig};
use nerve_nn::checkpoint::load_safetensors;
use nerve_nn::{load_model, Module, ModuleExt};

use crate::models::config_from;
use crate::trainer::{self, MicroBatch, Task};
use crate::{checkpoint_file, checkpoint_kind, meta_get, stored_config, TrainArgs};

/// Probability that a training label is replaced by the null class (classifier-free
/// guidance).
const LABEL_DROPOUT: f64 = 0.1;

/// The U-Net for images `dims` (`[C, H, W]`, square) of `classes` classes.
fn build(
    dims: &[usize],
    classes: usize,
    config: Option<&serde_json::Value>,
) -> Result<(UNet, serde_json::Value)> {
    if dims.len() != 3 || dims[1] != dims[2] {
        bail!("--model ddpm needs square images [channels, size, size]; these are {dims:?}");
    }
    let (c, json): (UNetConfig, _) = config_from(
        "ddpm",
        config,
        &[
            ("in_channels", dims[0].into()),
            ("sample_size", dims[1].into()),
            ("num_classes", classes.into()),
        ],
    )?;
    Ok((UNet::new(c)?, json))
}

/// Pixels in [0, 1] → the model's [-1, 1].
fn to_model_range(x: &Tensor) -> Result<Tensor> {
    Ok(x.mul_scalar(2.0)?.sub_scalar(1.0)?)
}

/// `nerve train --model ddpm`: DDPM's noise-prediction loss (linear β schedule over 1000
/// steps) with 10% label dropout, a checkpoint and a sample grid every `--eval-every` steps.
pub fn train(a: &TrainArgs, dp: &DataParallel) -> Result<()> {
    if a.epochs.is_some() || a.seq_len.is_some() || a.augment_pad > 0 {
        bail!("--model ddpm trains for --steps (no --epochs, --seq-len or --augment-pad)");
    }
    let data_name = a.data();
    let splits = crate::data::load(&data_name, a.data_dir.as_deref(), a.val_fraction, a.seed)?;
    let dims = splits.train.sample_dims().to_vec();
    let classes = splits.train.num_classes();
    let (model, config) = build(&dims, classes, a.config_json()?.as_ref())?;
    let net: &dyn Module = &model;
    let batch = a.global_batch(64)?;
    let steps = a.steps.unwrap_or(5000);
    let opt = crate::make_optimizer(a, net.parameters());
    let set = a.settings(steps, 500, 1.0, steps / 20)?;
    let meta = HashMap::from([
        ("nerve.model".to_string(), "ddpm".to_string()),
        ("nerve.data".to_string(), data_name.clone()),
        ("nerve.config".to_string(), config.to_string()),
        ("nerve.seed".to_string(), a.seed.to_string()),
    ]);
    let mut trainer = trainer::start(&a.run, net, opt, set, &config, &meta, dp)?;
    a.say(&format!(
        "training ddpm ({} parameters, config {config}) on {data_name} ({} images of {dims:?}, {classes} classes) for {steps} steps of {batch}, {:?} lr {}",
        net.num_parameters(),
        splits.train.len(),
        a.optimizer,
        a.lr
    ));
    let loader = DataLoader::new(splits.train.clone(), batch)
        .shuffle(a.seed)
        .drop_last(true)
        .shard(a.shard);
    if loader.num_batches() == 0 {
        bail!(
            "--data {data_name}: fewer than one batch of {batch} training images (lower --batch-size)"
        );
    }
    let mut task = DdpmTask {
        model: &model,
        schedule: DdpmSchedule::default(),
        per_epoch: loader.num_batches(),
        loader,
        batches: None,
        val: splits.val,
        accumulate: a.accumulate,
        seed: a.seed,
        shard: a.shard,
        dims,
        classes,
        meta,
    };
    trainer.fit(&mut task)
}

/// Held-out images in each validation loss (at most).
const VAL_IMAGES: usize = 256;

/// Training the diffusion model: DDPM's noise-prediction loss with 10% label dropout on
/// shuffled batches, a validation loss with fixed noise, and a sample grid per evaluation.
struct DdpmTask<'a> {
    model: &'a UNet,
    schedule: DdpmSchedule,
    loader: DataLoader,
    per_epoch: usize,
    /// The epoch being read, the index of its next batch, and its batches.
    batches: Option<(usize, usize, Batches)>,
    val: Dataset,
    accumulate: usize,
    seed: u64,
    /// This rank's images of each batch (with noise of its own).
    shard: Shard,
    dims: Vec<usize>,
    classes: usize,
    meta: HashMap<String, String>,
}

impl DdpmTask<'_> {
    /// The generator of the noise and timesteps of global batch `g` (from the seed alone,
    /// so a resumed run draws the same).
    fn noise(&self, g: usize) -> Generator {
        let seed = self.seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ g as u64;
        // Each rank draws its own noise (PyTorch DDP ranks have their own generators).
        Generator::new(
            seed.wrapping_add((self.shard.rank as u64).wrapping_mul(0xD1B5_4A32_D192_ED03)),
        )
    }
}

impl Task for DdpmTask<'_> {
    fn micro_step(&mut self, step: usize, micro: usize, n: usize) -> Result<MicroBatch> {
        let g = step * self.accumulate + micro;
        let (epoch, b) = (g / self.per_epoch, g % self.per_epoch);
        if !matches!(&self.batches, Some((e, i, _)) if *e == epoch && *i == b) {
            self.batches = Some((epoch, b, self.loader.epoch_from(epoch, b)));
        }
        let (_, next, batches) = self.batches.as_mut().expect("set above");
        let (x, y) = batches
            .next()
            .with_context(|| format!("epoch {epoch} has no batch {b}"))??;
        *next += 1;
        let mut gen = self.noise(g);
        let l = ddpm_loss(
            self.model,
            &self.schedule,
            &to_model_range(&x)?,
            Some(&y),
            LABEL_DROPOUT,
            &mut gen,
        )?;
        trainer::backward_mean(&l, n, self.shard.loss_scale(self.loader.batch_rows(b)))?;
        Ok(MicroBatch {
            loss: l.item::<f32>()? as f64,
            samples: y.numel(),
            correct: None,
        })
    }

    fn micro_batches(&self, _step: usize) -> usize {
        self.accumulate
    }

    fn epoch(&self, steps: usize) -> Option<f64> {
        Some((steps * self.accumulate) as f64 / self.per_epoch as f64)
    }

    /// The noise-prediction loss on up to 256 held-out images with the same noise and
    /// timesteps every time (no label dropout), so evaluations compare.
    fn evaluate(&mut self) -> Result<Vec<(&'static str, f64)>> {
        let n = self.val.len().min(VAL_IMAGES);
        if n == 0 {
            return Ok(Vec::new());
        }
        self.model.eval();
        let mut gen = Generator::new(self.seed ^ 0x5EED_0FDA_7A00);
        let (mut total, mut count) = (0.0, 0usize);
        for chunk in (0..n).collect::<Vec<_>>().chunks(64) {
            let (x, y) = self.val.batch(chunk)?;
            let x = to_model_range(&x)?;
            let l = no_grad(|| ddpm_loss(self.model, &self.schedule, &x, Some(&y), 0.0, &mut gen))?;
            total += l.item::<f32>()? as f64 * chunk.len() as f64;
            count += chunk.len();
        }
        Ok(vec![("val_loss", total / count as f64)])
    }

    /// One sample of each class (DDIM, 25 steps) into samples.png, so the run can be watched.
    fn after_eval(&mut self, dir: &Path) -> Result<()> {
        let labels: Vec<i64> = (0..self.classes as i64).collect();
        let mut g = Generator::new(self.seed);
        let d = &self.dims;
        self.model.eval();
        let imgs = sample_ddim(
            self.model,
            &self.schedule,
            Some(&Tensor::from_vec(labels, [self.classes])?),
            &[self.classes, d[0], d[1], d[2]],
            25,
            0.0,
            &SampleOptions::default(),
            &mut g,
        )?;
        self.model.train();
        save_png_grid(&imgs, self.classes, (-1.0, 1.0), dir.join("samples.png"))?;
        Ok(())
    }

    fn meta(&self) -> HashMap<String, String> {
        self.meta.clone()
    }

    fn throughput_key(&self) -> &'static str {
        "images_per_s"
    }
}

/// Arguments of `nerve sample`.
#[derive(clap::Args)]
pub struct SampleArgs {
    /// A run folder written by `nerve train --model ddpm`, or its model.safetensors.
    #[arg(long)]
    checkpoint: PathBuf,
    /// Draw images of this class (default: every class, one row each).
    #[arg(long)]
    class: Option<usize>,
    /// Images per class.
    #[arg(long, default_value_t = 16)]
    n: usize,
    /// DDIM steps (0: the full 1000-step ancestral DDPM sampler).
    #[arg(long, default_value_t = 50)]
    steps: usize,
    /// DDIM's eta (0: deterministic).
    #[arg(long, default_value_t = 0.0)]
    eta: f64,
    /// Classifier-free guidance scale (1: plain conditional sampling).
    #[arg(long, default_value_t = 1.0)]
    guidance: f64,
    /// The PNG grid to write.
    #[arg(long, default_value = "samples.png")]
    out: PathBuf,
    /// Seed of the sampler.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// A classifier run (`nerve train --model cnn` on the same data) that classifies the
    /// samples: prints how often it agrees with the requested class.
    #[arg(long)]
    classifier: Option<PathBuf>,
}

/// `nerve sample`: draw images from a trained diffusion model into a PNG grid.
pub fn sample(a: SampleArgs) -> Result<()> {
    let file = checkpoint_file(&a.checkpoint);
    let (_, meta) = load_safetensors(&file)?;
    if checkpoint_kind(&meta, &file)?.name() != "ddpm" {
        bail!(
            "{}: not a diffusion model; `nerve sample` needs a `nerve train --model ddpm` run",
            file.display()
        );
    }
    let config: UNetConfig = serde_json::from_value(stored_config(&meta, &file)?)
        .with_context(|| format!("{}: bad nerve.config", file.display()))?;
    let classes = config.num_classes.unwrap_or(0);
    let dims = [config.in_channels, config.sample_size, config.sample_size];
    let model = UNet::new(config)?;
    load_model(&model, &file)?;
    model.eval();
    if a.n == 0 {
        bail!("--n must be at least 1");
    }
    let wanted: Vec<usize> = match a.class {
        Some(c) if c >= classes => bail!(
            "--class {c}: the model knows classes 0..{}",
            classes.saturating_sub(1)
        ),
        Some(c) => vec![c],
        None => (0..classes).collect(),
    };
    let labels: Vec<i64> = wanted
        .iter()
        .flat_map(|&c| std::iter::repeat_n(c as i64, a.n))
        .collect();
    let total = labels.len();
    let y = Tensor::from_vec(labels.clone(), [total])?;
    let shape = [total, dims[0], dims[1], dims[2]];
    let opts = SampleOptions {
        guidance_scale: a.guidance,
        ..SampleOptions::default()
    };
    let mut g = Generator::new(a.seed);
    let t0 = Instant::now();
    let schedule = DdpmSchedule::default();
    let imgs = if a.steps == 0 {
        sample_ddpm(&model, &schedule, Some(&y), &shape, &opts, &mut g)?
    } else {
        sample_ddim(
            &model,
            &schedule,
            Some(&y),
            &shape,
            a.steps,
            a.eta,
            &opts,
            &mut g,
        )?
    };
    let secs = t0.elapsed().as_secs_f64();
    let nrow = if a.class.is_some() {
        (a.n as f64).sqrt().ceil() as usize
    } else {
        a.n
    };
    save_png_grid(&imgs, nrow, (-1.0, 1.0), &a.out)?;
    println!(
        "{total} samples ({}) in {secs:.1}s → {}",
        if a.steps == 0 {
            "DDPM, 1000 steps".to_string()
        } else {
            format!("DDIM, {} steps, eta {}", a.steps, a.eta)
        },
        a.out.display()
    );
    if let Some(c) = &a.classifier {
        score(c, &imgs, &labels, &wanted)?;
    }
    Ok(())
}

/// Classify `imgs` (in [-1, 1]) with a classifier run and print the agreement per class.
fn score(run: &Path, imgs: &Tensor, labels: &[i64], wanted: &[usize]) -> Result<()> {
    let file = checkpoint_file(run);
    let (_, meta) = load_safetensors(&file)?;
    let kind = checkpoint_kind(&meta, &file)?;
    let parse = |k: &str| -> Result<f64> {
        meta_get(&meta, k, &file)?
            .parse::<f64>()
            .with_context(|| format!("{}: bad `{k}`", file.display()))
    };
    let dims: Vec<usize> = imgs.dims()[1..].to_vec();
    let classes = parse("nerve.classes")? as usize;
    let (clf, _) = crate::models::build(kind, &dims, classes, Some(&stored_config(&meta, &file)?))?;
    load_model(clf.as_ref(), &file)?;
    clf.eval();
    let (mean, std) = (parse("nerve.mean")?, parse("nerve.std")?);
    // [-1, 1] → [0, 1] pixels → the classifier's normalisation.
    let x = imgs
        .add_scalar(1.0)?
        .mul_scalar(0.5)?
        .clamp(Some(0.0), Some(1.0))?
        .sub_scalar(mean)?
        .div_scalar(std)?;
    let pred: Vec<i64> = no_grad(|| clf.forward(&x))?.argmax(-1, false)?.to_vec()?;
    let mut per = vec![(0usize, 0usize); wanted.iter().max().map_or(0, |m| m + 1)];
    for (p, t) in pred.iter().zip(labels) {
        let e = &mut per[*t as usize];
        e.0 += (p == t) as usize;
        e.1 += 1;
    }
    let agree: usize = per.iter().map(|e| e.0).sum();
    println!(
        "classifier {} agrees with the requested class on {agree}/{} samples ({:.1}%)",
        file.display(),
        labels.len(),
        100.0 * agree as f64 / labels.len() as f64
    );
    for &c in wanted {
        println!("  class {c}: {}/{}", per[c].0, per[c].1);
    }
    Ok(())
}

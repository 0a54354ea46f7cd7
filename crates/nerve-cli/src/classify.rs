//! `nerve classify IMAGE...`: the ImageNet classes of photos with the pretrained
//! EfficientNet-Lite0 (fetched with `nerve data get efficientnet-lite0`).

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, Context, Result};
use clap::Args;
use nerve_core::no_grad;
use nerve_models::efficientnet::{imagenet_classes, top_k, EfficientNet};
use nerve_nn::Module;

/// Arguments of `nerve classify`.
#[derive(Args, Debug)]
pub struct ClassifyArgs {
    /// Photos to classify (JPEG or PNG).
    #[arg(required = true, value_name = "IMAGE")]
    pub images: Vec<PathBuf>,
    /// EfficientNet-Lite0 checkpoint (.pth) [default:
    /// <data root>/efficientnet-lite0/efficientnet-lite0-57934424.pth, from `nerve data get
    /// efficientnet-lite0`].
    #[arg(long, value_name = "FILE.pth")]
    pub model: Option<PathBuf>,
    /// How many classes to show per image.
    #[arg(long, default_value_t = 5)]
    pub top: usize,
    /// Print a JSON array (one object per image) instead of text.
    #[arg(long)]
    pub json: bool,
}

/// The checkpoint `nerve data get efficientnet-lite0` writes.
pub fn default_model_path() -> PathBuf {
    crate::data::data_root()
        .join("efficientnet-lite0")
        .join(crate::data::EFFICIENTNET_FILE)
}

/// Classify each image and print its `--top` classes with their probabilities.
pub fn run(args: &ClassifyArgs) -> Result<()> {
    if args.top == 0 {
        bail!("--top must be at least 1");
    }
    let path = match &args.model {
        Some(p) => {
            if !p.is_file() {
                bail!("--model {}: no such file", p.display());
            }
            p.clone()
        }
        None => {
            let p = default_model_path();
            if !p.is_file() {
                bail!(
                    "{} does not exist; fetch EfficientNet-Lite0 with `nerve data get efficientnet-lite0` \
                     (or pass --model FILE.pth)",
                    p.display()
                );
            }
            p
        }
    };
    let t0 = Instant::now();
    let model = EfficientNet::load(&path)?;
    let load_time = t0.elapsed();
    let preprocess = model.config().preprocess();
    let classes = imagenet_classes();
    let mut results = Vec::with_capacity(args.images.len());
    for image in &args.images {
        let t = Instant::now();
        let x = preprocess
            .load(image)?
            .unsqueeze(0)
            .with_context(|| image.display().to_string())?;
        let logits = no_grad(|| model.forward(&x)).with_context(|| image.display().to_string())?;
        let top = top_k(&logits, args.top)?.remove(0);
        let elapsed = t.elapsed();
        if args.json {
            results.push(serde_json::json!({
                "image": image.display().to_string(),
                "top": top.iter().map(|&(i, p)| serde_json::json!({
                    "index": i,
                    "class": classes.get(i).copied().unwrap_or(""),
                    "prob": p,
                })).collect::<Vec<_>>(),
            }));
        } else {
            print_text(image, &top, classes, elapsed.as_secs_f64());
        }
    }
    if args.json {
        println!("{}", serde_json::to_string_pretty(&results)?);
    } else {
        eprintln!(
            "(EfficientNet-Lite0 from {} loaded in {:.2} s)",
            path.display(),
            load_time.as_secs_f64()
        );
    }
    Ok(())
}

fn print_text(image: &Path, top: &[(usize, f32)], classes: &[&str], secs: f64) {
    println!("{} ({:.0} ms)", image.display(), secs * 1e3);
    for &(i, p) in top {
        let name = classes.get(i).copied().unwrap_or("?");
        println!("  {:>6.2}%  {name} ({i})", p * 100.0);
    }
}

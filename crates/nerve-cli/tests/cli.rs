//! The `nerve` binary end to end: the default run, eval, resume, and clear errors on bad input.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn nerve(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_nerve"))
        .args(args)
        .output()
        .expect("run nerve")
}

fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

fn tmp(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("nerve-cli-test-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// The best validation accuracy in a run folder's metrics.jsonl.
fn best_accuracy(run: &Path) -> f64 {
    std::fs::read_to_string(run.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter_map(|r| r["val_accuracy"].as_f64())
        .fold(0.0, f64::max)
}

/// The evaluation records in a run folder's metrics.jsonl.
fn evals(run: &Path) -> usize {
    std::fs::read_to_string(run.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .filter(|l| l.contains(r#""kind":"eval""#))
        .count()
}

/// `nerve train` with its defaults: the CNN on the embedded digits reaches ≥ 97% validation
/// accuracy in seconds; `nerve eval` reads the checkpoint back.
#[test]
fn default_train_then_eval() {
    let dir = tmp("default");
    let out_dir = dir.join("run");
    let o = nerve(&["train", "--out", out_dir.to_str().unwrap(), "--no-progress"]);
    let t = text(&o);
    assert!(o.status.success(), "{t}");
    assert!(best_accuracy(&out_dir) >= 0.97, "{t}");
    for f in [
        "model.safetensors",
        "best.safetensors",
        "metrics.jsonl",
        "config.json",
        "loss.png",
    ] {
        assert!(out_dir.join(f).is_file(), "{f} missing");
    }
    assert_eq!(evals(&out_dir), 20);
    let o = nerve(&["eval", out_dir.to_str().unwrap()]);
    let t = text(&o);
    assert!(o.status.success(), "{t}");
    assert!(
        t.contains("accuracy") && t.contains("confusion matrix"),
        "{t}"
    );
    std::fs::remove_dir_all(dir).ok();
}

#[test]
fn resume_continues_the_run() {
    let dir = tmp("resume");
    let out = dir.join("run");
    let o = nerve(&[
        "train",
        "--model",
        "mlp",
        "--epochs",
        "2",
        "--out",
        out.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", text(&o));
    let o = nerve(&[
        "train",
        "--epochs",
        "4",
        "--resume",
        "--out",
        out.to_str().unwrap(),
    ]);
    let t = text(&o);
    assert!(o.status.success(), "{t}");
    assert!(
        t.contains("from step 52 of 104") && t.contains("epoch 3.00") && !t.contains("epoch 1.00"),
        "{t}"
    );
    assert_eq!(evals(&out), 4);
    std::fs::remove_dir_all(dir).ok();
}

fn fails_naming(args: &[&str], needles: &[&str]) {
    let o = nerve(args);
    let t = text(&o);
    assert!(!o.status.success(), "{args:?} should fail: {t}");
    for n in needles {
        assert!(t.contains(n), "{args:?}: `{n}` not in: {t}");
    }
}

#[test]
fn bad_input_gives_clear_errors() {
    let dir = tmp("bad");
    let d = |p: &str| dir.join(p).to_str().unwrap().to_string();
    // Unknown flag values.
    fails_naming(
        &["train", "--optimizer", "lion"],
        &["--optimizer", "lion", "adamw"],
    );
    fails_naming(
        &["train", "--data", "nowhere.csv"],
        &["--data", "nowhere.csv"],
    );
    // A CSV with a bad value and one whose label is not an integer class.
    std::fs::write(dir.join("bad.csv"), "1,2,0\n3,x,1\n").unwrap();
    fails_naming(
        &["train", "--model", "mlp", "--data", &d("bad.csv")],
        &["bad.csv", "2"],
    );
    // The CNN on tabular data.
    std::fs::write(dir.join("ok.csv"), "1,2,0\n3,4,1\n5,6,0\n7,8,1\n").unwrap();
    fails_naming(
        &["train", "--model", "cnn", "--data", &d("ok.csv")],
        &["--model cnn", "image"],
    );
    // A label that would make a 10^12-class model: refused, naming the file.
    std::fs::write(dir.join("huge.csv"), "1,2,0\n3,4,999999999999\n").unwrap();
    fails_naming(
        &["train", "--model", "mlp", "--data", &d("huge.csv")],
        &["huge.csv", "labels up to 999999999999"],
    );
    // More classes in the data than the model has outputs.
    std::fs::write(dir.join("more.csv"), "1,2,0\n3,4,50\n").unwrap();
    let small = dir.join("small");
    let o = nerve(&[
        "train",
        "--model",
        "mlp",
        "--data",
        &d("ok.csv"),
        "--epochs",
        "1",
        "--monitor",
        "loss",
        "--out",
        small.to_str().unwrap(),
        "--quiet",
    ]);
    assert!(o.status.success(), "{}", text(&o));
    fails_naming(
        &["eval", small.to_str().unwrap(), "--data", &d("more.csv")],
        &["more.csv", "51 classes", "do not fit"],
    );
    // A truncated IDX file.
    let mnist = dir.join("mnist");
    std::fs::create_dir_all(&mnist).unwrap();
    let mut img = vec![0u8, 0, 8, 3, 0, 0, 0, 2, 0, 0, 0, 28, 0, 0, 0, 28];
    img.extend(vec![0u8; 100]);
    std::fs::write(mnist.join("train-images-idx3-ubyte"), &img).unwrap();
    std::fs::write(
        mnist.join("train-labels-idx1-ubyte"),
        [0u8, 0, 8, 1, 0, 0, 0, 2, 3, 4],
    )
    .unwrap();
    fails_naming(
        &["train", "--data", "mnist", "--data-dir", &d("mnist")],
        &["train-images-idx3-ubyte"],
    );
    // A corrupt checkpoint, for eval and for resume; the file is left as it was.
    let run = dir.join("run");
    std::fs::create_dir_all(run.join("checkpoints")).unwrap();
    std::fs::write(run.join("model.safetensors"), b"not a checkpoint").unwrap();
    let bad_step = run.join("checkpoints/step-00000001.safetensors");
    std::fs::write(&bad_step, b"not a checkpoint").unwrap();
    std::fs::write(
        run.join("config.json"),
        r#"{"command": ["--model", "mlp"]}"#,
    )
    .unwrap();
    fails_naming(&["eval", &d("run")], &["model.safetensors"]);
    fails_naming(
        &["train", "--resume", &d("run")],
        &[
            "step-00000001.safetensors",
            "no checkpoint of the run could be loaded",
        ],
    );
    assert_eq!(std::fs::read(&bad_step).unwrap(), b"not a checkpoint");
    fails_naming(
        &["train", "--resume", &d("nowhere")],
        &["--resume", "config.json"],
    );
    // A checkpoint of another model: refused, naming what differs.
    let o = nerve(&[
        "train",
        "--model",
        "mlp",
        "--epochs",
        "1",
        "--out",
        &d("mlp"),
    ]);
    assert!(o.status.success(), "{}", text(&o));
    let before = std::fs::read(dir.join("mlp/model.safetensors")).unwrap();
    fails_naming(
        &["train", "--model", "cnn", "--resume", &d("mlp")],
        &["step-00000026.safetensors", "`nerve.model` is mlp", "cnn"],
    );
    assert_eq!(
        std::fs::read(dir.join("mlp/model.safetensors")).unwrap(),
        before
    );
    let _ = Path::new(&dir);
    std::fs::remove_dir_all(dir).ok();
}

/// A text a small model learns in a few dozen steps.
fn toy_text(dir: &Path) -> PathBuf {
    let p = dir.join("toy.txt");
    std::fs::write(&p, "the cat sat on the mat.\n".repeat(300)).unwrap();
    p
}

/// The held-out loss of the last `step` line.
fn last_val_loss(out: &str) -> f64 {
    let line = out
        .lines()
        .rev()
        .find(|l| l.starts_with("step") && l.contains("val loss"))
        .expect("step line");
    let mut w = line.split_whitespace();
    w.find(|&x| x == "val").unwrap();
    w.next();
    w.next().unwrap().parse().unwrap()
}

/// Language models: train (gpt and lstm, small configs), resume, evaluate and generate; the
/// models learn the toy text, and greedy generation continues it.
#[test]
fn language_models_train_resume_and_generate() {
    let dir = tmp("lm");
    let data = toy_text(&dir);
    let config = dir.join("gpt.json");
    std::fs::write(
        &config,
        r#"{"layers": 1, "width": 32, "heads": 2, "context": 32}"#,
    )
    .unwrap();
    let run = dir.join("gpt");
    let base = [
        "train",
        "--model",
        "gpt",
        "--data",
        data.to_str().unwrap(),
        "--config",
        config.to_str().unwrap(),
        "--seq-len",
        "32",
        "--batch-size",
        "16",
        "--lr",
        "3e-3",
        "--eval-every",
        "40",
        "--out",
        run.to_str().unwrap(),
        "--no-progress",
    ];
    let o = nerve(&[&base[..], &["--steps", "80"]].concat());
    let t = text(&o);
    assert!(o.status.success(), "{t}");
    assert!(last_val_loss(&t) < 0.3, "{t}");
    let cfg = std::fs::read_to_string(run.join("config.json")).unwrap();
    assert!(cfg.contains("\"width\": 32"), "{cfg}");
    let o = nerve(&[&base[..], &["--steps", "120", "--resume"]].concat());
    let t = text(&o);
    assert!(o.status.success(), "{t}");
    assert!(
        t.contains("from step 80") && t.contains("step    120/120"),
        "{t}"
    );
    let o = nerve(&["eval", run.to_str().unwrap()]);
    let t = text(&o);
    assert!(o.status.success() && t.contains("nats/char"), "{t}");
    let o = nerve(&[
        "generate",
        "--checkpoint",
        run.to_str().unwrap(),
        "--prompt",
        "the cat ",
        "--tokens",
        "40",
        "--temperature",
        "0",
    ]);
    let t = text(&o);
    assert!(o.status.success(), "{t}");
    assert!(t.starts_with("the cat sat on the mat.\nthe cat sat"), "{t}");

    let run = dir.join("lstm");
    let cfg = dir.join("lstm.json");
    std::fs::write(&cfg, r#"{"embedding": 16, "hidden": 64}"#).unwrap();
    let o = nerve(&[
        "train",
        "--model",
        "lstm",
        "--data",
        data.to_str().unwrap(),
        "--config",
        cfg.to_str().unwrap(),
        "--steps",
        "100",
        "--batch-size",
        "16",
        "--seq-len",
        "24",
        "--lr",
        "1e-2",
        "--eval-every",
        "50",
        "--out",
        run.to_str().unwrap(),
        "--no-progress",
    ]);
    let t = text(&o);
    assert!(o.status.success(), "{t}");
    assert!(last_val_loss(&t) < 0.3, "{t}");
    let o = nerve(&[
        "generate",
        "--checkpoint",
        run.to_str().unwrap(),
        "--prompt",
        "on the",
        "--tokens",
        "10",
        "--temperature",
        "0",
    ]);
    let t = text(&o);
    assert!(t.starts_with("on the mat.\nthe"), "{t}");
    // A config too big for the machine is refused before anything is allocated.
    let huge = dir.join("huge.json");
    std::fs::write(&huge, r#"{"width": 1048576, "heads": 1}"#).unwrap();
    fails_naming(
        &[
            "train",
            "--model",
            "gpt",
            "--data",
            data.to_str().unwrap(),
            "--config",
            huge.to_str().unwrap(),
        ],
        &["GptConfig", "width", "memory"],
    );

    // Bad input: characters outside the vocabulary, an empty prompt, inconsistent configs,
    // a sequence longer than the context, generating from a classifier.
    let gpt = dir.join("gpt");
    fails_naming(
        &[
            "generate",
            "--checkpoint",
            gpt.to_str().unwrap(),
            "--prompt",
            "ROMEO",
        ],
        &["'R'", "'O'", "'M'", "vocabulary"],
    );
    fails_naming(
        &[
            "generate",
            "--checkpoint",
            gpt.to_str().unwrap(),
            "--prompt",
            "",
        ],
        &["--prompt is empty"],
    );
    let bad = dir.join("bad.json");
    std::fs::write(&bad, r#"{"width": 30, "heads": 4}"#).unwrap();
    fails_naming(
        &[
            "train",
            "--model",
            "gpt",
            "--data",
            data.to_str().unwrap(),
            "--config",
            bad.to_str().unwrap(),
        ],
        &["width (30)", "heads (4)"],
    );
    std::fs::write(&bad, r#"{"vocab_size": 5}"#).unwrap();
    fails_naming(
        &[
            "train",
            "--model",
            "gpt",
            "--data",
            data.to_str().unwrap(),
            "--config",
            bad.to_str().unwrap(),
        ],
        &["vocab_size", "data needs 12"],
    );
    std::fs::write(&bad, r#"{"hidden_size": 5}"#).unwrap();
    fails_naming(
        &[
            "train",
            "--model",
            "lstm",
            "--data",
            data.to_str().unwrap(),
            "--config",
            bad.to_str().unwrap(),
        ],
        &["unknown field `hidden_size`", "expected one of"],
    );
    fails_naming(
        &[
            "train",
            "--model",
            "gpt",
            "--data",
            data.to_str().unwrap(),
            "--config",
            config.to_str().unwrap(),
            "--seq-len",
            "64",
        ],
        &["--seq-len 64", "context (32"],
    );
    let cls = dir.join("cls");
    let o = nerve(&[
        "train",
        "--epochs",
        "1",
        "--out",
        cls.to_str().unwrap(),
        "--no-progress",
    ]);
    assert!(o.status.success(), "{}", text(&o));
    fails_naming(
        &["generate", "--checkpoint", cls.to_str().unwrap()],
        &["not a language model"],
    );
}

/// Diffusion: a tiny U-Net trains on the digits, `nerve sample` writes a PNG grid and scores
/// the samples with a classifier run; bad requests are refused.
#[test]
fn ddpm_train_and_sample() {
    let dir = tmp("ddpm");
    let cfg = dir.join("unet.json");
    std::fs::write(
        &cfg,
        r#"{"base_channels": 8, "channel_mult": [1, 2], "norm_groups": 4, "time_embed_dim": 16, "attention": false}"#,
    )
    .unwrap();
    let run = dir.join("ddpm");
    let o = nerve(&[
        "train",
        "--model",
        "ddpm",
        "--config",
        cfg.to_str().unwrap(),
        "--steps",
        "10",
        "--eval-every",
        "5",
        "--out",
        run.to_str().unwrap(),
        "--no-progress",
    ]);
    let t = text(&o);
    assert!(o.status.success(), "{t}");
    assert!(
        t.contains("step     10/10") && run.join("samples.png").is_file(),
        "{t}"
    );
    let cls = dir.join("cnn");
    let o = nerve(&[
        "train",
        "--epochs",
        "1",
        "--out",
        cls.to_str().unwrap(),
        "--no-progress",
    ]);
    assert!(o.status.success(), "{}", text(&o));
    let png = dir.join("grid.png");
    let o = nerve(&[
        "sample",
        "--checkpoint",
        run.to_str().unwrap(),
        "--class",
        "3",
        "--n",
        "4",
        "--steps",
        "5",
        "--out",
        png.to_str().unwrap(),
        "--classifier",
        cls.to_str().unwrap(),
    ]);
    let t = text(&o);
    assert!(o.status.success(), "{t}");
    assert!(
        t.contains("agrees with the requested class on") && t.contains("class 3: "),
        "{t}"
    );
    let bytes = std::fs::read(&png).unwrap();
    assert_eq!(&bytes[..8], b"\x89PNG\r\n\x1a\n");
    fails_naming(
        &[
            "sample",
            "--checkpoint",
            run.to_str().unwrap(),
            "--class",
            "10",
        ],
        &["--class 10", "0..9"],
    );
    fails_naming(
        &["sample", "--checkpoint", cls.to_str().unwrap()],
        &["not a diffusion model"],
    );
    fails_naming(&["eval", run.to_str().unwrap()], &["nerve sample"]);
}

/// The number after `key` in `out` (e.g. the accuracy in "held-out accuracy 31.4% -> 95.7%").
fn figures_after(out: &str, key: &str) -> Vec<f64> {
    let line = out
        .lines()
        .find(|l| l.starts_with(key))
        .unwrap_or_else(|| panic!("no line starting {key:?} in:\n{out}"));
    line[key.len()..]
        .split_whitespace()
        .filter_map(|w| w.trim_end_matches(['%', ';', ',']).parse().ok())
        .collect()
}

#[test]
fn finetune_minilm_classifier_with_lora() {
    let Ok(dir) = std::env::var("NERVE_MINILM_DIR") else {
        eprintln!("NERVE_MINILM_DIR is not set: MiniLM fine-tuning skipped");
        return;
    };
    let out_dir = tmp("finetune-minilm");
    let o = nerve(&[
        "finetune",
        "--model",
        &dir,
        "--epochs",
        "3",
        "--no-progress",
        "--out",
        out_dir.to_str().unwrap(),
    ]);
    let t = text(&o);
    assert!(o.status.success(), "{t}");
    assert!(
        t.contains("trainable params: 75653 || all params: 22788869"),
        "{t}"
    );
    // Accuracy before and after on the 70 held-out intents.
    let acc = figures_after(&t, "held-out accuracy");
    assert!(acc[0] < 50.0 && acc[1] >= 90.0, "{t}");
    for f in [
        "adapter/adapter_model.safetensors",
        "adapter/adapter_config.json",
        "classifier.safetensors",
        "best-adapter/adapter_model.safetensors",
        "best-classifier.safetensors",
        "metrics.jsonl",
        "loss.png",
    ] {
        assert!(out_dir.join(f).exists(), "{f} missing");
    }
    // Step checkpoints hold only what trains (adapters, head) and the optimizer state.
    let ck = std::fs::read_dir(out_dir.join("checkpoints"))
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .max()
        .unwrap();
    assert!(std::fs::metadata(&ck).unwrap().len() < 4_000_000, "{ck:?}");
    // Stopped at step 20 of 42 and resumed, the run ends with the same adapter and head,
    // bit for bit.
    let resumed = tmp("finetune-minilm-resumed");
    let args = [
        "finetune",
        "--model",
        &dir,
        "--epochs",
        "3",
        "--no-progress",
        "--out",
        resumed.to_str().unwrap(),
    ];
    let o = nerve(&[&args[..], &["--stop-after", "20"]].concat());
    assert!(o.status.success(), "{}", text(&o));
    let o = nerve(&["finetune", "--resume", resumed.to_str().unwrap()]);
    let t = text(&o);
    assert!(o.status.success() && t.contains("from step 20"), "{t}");
    for f in [
        "adapter/adapter_model.safetensors",
        "classifier.safetensors",
    ] {
        assert_eq!(
            std::fs::read(out_dir.join(f)).unwrap(),
            std::fs::read(resumed.join(f)).unwrap(),
            "{f} differs after resume"
        );
    }
    std::fs::remove_dir_all(&resumed).ok();
    let o = nerve(&["report", out_dir.to_str().unwrap()]);
    assert!(o.status.success(), "{}", text(&o));
    let md = std::fs::read_to_string(out_dir.join("report.md")).unwrap();
    assert!(
        md.contains("finetune-classifier") && md.contains(r"val\_accuracy"),
        "{md}"
    );
    // A labelled file without its header is refused, naming it.
    let bad = out_dir.join("bad.tsv");
    std::fs::write(&bad, "positive\tgood\n").unwrap();
    let o = nerve(&["finetune", "--model", &dir, "--data", bad.to_str().unwrap()]);
    assert!(!o.status.success());
    assert!(
        text(&o).contains("bad.tsv: the first line must be the header"),
        "{}",
        text(&o)
    );
    std::fs::remove_dir_all(&out_dir).ok();
}

#[test]
fn finetune_smollm2_lora_then_generate_with_the_adapter() {
    let Ok(gguf) = std::env::var("NERVE_SMOLLM2_GGUF") else {
        eprintln!("NERVE_SMOLLM2_GGUF is not set: SmolLM2 fine-tuning skipped");
        return;
    };
    let out_dir = tmp("finetune-smollm2");
    let corpus = out_dir.join("verse.txt");
    let verse = "ROMEO:\nBut soft, what light through yonder window breaks?\n\
                 It is the east, and Juliet is the sun.\n\n";
    std::fs::write(&corpus, verse.repeat(60)).unwrap();
    let o = nerve(&[
        "finetune",
        "--model",
        &gguf,
        "--data",
        corpus.to_str().unwrap(),
        "--steps",
        "4",
        "--seq-len",
        "32",
        "--batch-size",
        "2",
        "--eval-every",
        "2",
        "--eval-windows",
        "2",
        "--lr",
        "2e-3",
        "--lora-dropout",
        "0",
        "--no-progress",
        "--out",
        out_dir.to_str().unwrap(),
    ]);
    let t = text(&o);
    assert!(o.status.success(), "{t}");
    assert!(
        t.contains("trainable params: 460800 || all params: 134975808"),
        "{t}"
    );
    // The held-out part repeats the training text: its loss must fall.
    let losses = figures_after(&t, "held-out loss");
    assert!(losses[1] < losses[0], "{t}");
    let adapter = out_dir.join("adapter");
    assert!(adapter.join("adapter_model.safetensors").exists());
    let o = nerve(&[
        "generate",
        "--model",
        &gguf,
        "--adapter",
        adapter.to_str().unwrap(),
        "--prompt",
        "ROMEO:",
        "--tokens",
        "4",
    ]);
    let t = text(&o);
    assert!(o.status.success(), "{t}");
    assert!(
        t.contains("merged the LoRA adapter") && t.contains("r=8, 60 modules"),
        "{t}"
    );
    // A missing adapter folder is refused, naming the file.
    let o = nerve(&[
        "generate",
        "--model",
        &gguf,
        "--adapter",
        "/nonexistent/adapter",
        "--prompt",
        "x",
    ]);
    assert!(!o.status.success());
    assert!(
        text(&o).contains("/nonexistent/adapter/adapter_config.json"),
        "{}",
        text(&o)
    );
    std::fs::remove_dir_all(&out_dir).ok();
}

#[test]
fn finetune_refuses_unknown_models() {
    let o = nerve(&["finetune", "--model", "/nonexistent/model.bin"]);
    assert!(!o.status.success());
    assert!(
        text(&o).contains("--model /nonexistent/model.bin: not `smollm2`, a .gguf file"),
        "{}",
        text(&o)
    );
    let o = nerve(&["finetune", "--model", "/nonexistent/m.gguf"]);
    assert!(!o.status.success());
    assert!(
        text(&o).contains("--model /nonexistent/m.gguf: no such file"),
        "{}",
        text(&o)
    );
}

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

fn best_accuracy(out: &str) -> f64 {
    let line = out
        .lines()
        .find(|l| l.starts_with("best validation accuracy"))
        .expect("summary line");
    line.split_whitespace()
        .nth(3)
        .unwrap()
        .trim_end_matches("%;")
        .parse()
        .unwrap()
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
    assert!(best_accuracy(&t) >= 97.0, "{t}");
    for f in ["model.safetensors", "optimizer.safetensors", "metrics.csv"] {
        assert!(out_dir.join(f).is_file(), "{f} missing");
    }
    let metrics = std::fs::read_to_string(out_dir.join("metrics.csv")).unwrap();
    assert_eq!(metrics.lines().count(), 21, "{metrics}");
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
        "--model",
        "mlp",
        "--epochs",
        "4",
        "--resume",
        "--out",
        out.to_str().unwrap(),
    ]);
    let t = text(&o);
    assert!(o.status.success(), "{t}");
    assert!(
        t.contains("resuming") && t.contains("epoch   3/4") && !t.contains("epoch   1/4"),
        "{t}"
    );
    let metrics = std::fs::read_to_string(out.join("metrics.csv")).unwrap();
    assert_eq!(metrics.lines().count(), 5, "{metrics}");
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
    std::fs::create_dir_all(&run).unwrap();
    std::fs::write(run.join("model.safetensors"), b"not a checkpoint").unwrap();
    fails_naming(&["eval", &d("run")], &["model.safetensors"]);
    fails_naming(
        &["train", "--resume", "--out", &d("run")],
        &["model.safetensors"],
    );
    assert_eq!(
        std::fs::read(run.join("model.safetensors")).unwrap(),
        b"not a checkpoint"
    );
    // A checkpoint of another model: the mismatch names the tensors.
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
        &["train", "--model", "cnn", "--resume", "--out", &d("mlp")],
        &["model.safetensors", "0.weight"],
    );
    assert_eq!(
        std::fs::read(dir.join("mlp/model.safetensors")).unwrap(),
        before
    );
    let _ = Path::new(&dir);
    std::fs::remove_dir_all(dir).ok();
}

//! Run folders of `nerve train`: exact resume, crash safety (`kill -9` at random moments,
//! SIGTERM), non-finite steps, early stopping, kept checkpoints and the output modes.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use nerve_core::Tensor;
use nerve_nn::checkpoint::load_safetensors;

fn nerve(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_nerve"))
        .args(args)
        .output()
        .expect("run nerve")
}

fn spawn(args: &[&str]) -> Child {
    Command::new(env!("CARGO_BIN_EXE_nerve"))
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start nerve")
}

fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

fn tmp(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("nerve-runs-test-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// Every tensor of a safetensors file, as exact bits.
fn tensors(path: &Path) -> HashMap<String, Vec<u64>> {
    let (t, _) = load_safetensors(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    t.into_iter()
        .map(|(k, v): (String, Tensor)| (k, v.to_f64_vec().iter().map(|x| x.to_bits()).collect()))
        .collect()
}

/// The newest step checkpoint of a run, if any.
fn newest_checkpoint(run: &Path) -> Option<(usize, PathBuf)> {
    let mut v: Vec<(usize, PathBuf)> = std::fs::read_dir(run.join("checkpoints"))
        .ok()?
        .flatten()
        .filter_map(|e| {
            let n = e.file_name().into_string().ok()?;
            let step = n
                .strip_prefix("step-")?
                .strip_suffix(".safetensors")?
                .parse()
                .ok()?;
            Some((step, e.path()))
        })
        .collect();
    v.sort();
    v.pop()
}

/// The records of metrics.jsonl (every line must parse).
fn records(run: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(run.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{l}: {e}")))
        .collect()
}

/// The final model and optimizer state of two runs are the same bits.
fn assert_same_state(a: &Path, b: &Path) {
    let (sa, _) = newest_checkpoint(a).unwrap();
    let (sb, _) = newest_checkpoint(b).unwrap();
    assert_eq!(sa, sb, "final steps differ");
    let ta = tensors(&newest_checkpoint(a).unwrap().1);
    let tb = tensors(&newest_checkpoint(b).unwrap().1);
    assert!(ta.keys().any(|k| k.starts_with("optimizer/")));
    assert_eq!(ta.len(), tb.len());
    for (k, v) in &ta {
        assert!(
            tb[k] == *v,
            "{k} differs between {} and {}",
            a.display(),
            b.display()
        );
    }
}

/// A classifier run with everything a resume must restore: a cosine schedule (needs the
/// step), accumulation over batches (windows within epochs), augmentation (seeded by epoch
/// and batch) and Adam state.
fn mlp_args(run: &Path) -> Vec<String> {
    [
        "train",
        "--model",
        "mlp",
        "--epochs",
        "3",
        "--schedule",
        "cosine",
        "--accumulate",
        "2",
        "--augment-pad",
        "1",
        "--batch-size",
        "32",
        "--out",
        s(run),
        "--no-progress",
    ]
    .iter()
    .map(|x| x.to_string())
    .collect()
}

fn run_ok(args: &[String], extra: &[&str]) -> String {
    let mut all: Vec<&str> = args.iter().map(String::as_str).collect();
    all.extend(extra);
    let o = nerve(&all);
    let t = text(&o);
    assert!(o.status.success(), "{all:?}: {t}");
    t
}

#[test]
fn stopped_and_resumed_runs_match_uninterrupted_ones_bit_for_bit() {
    let dir = tmp("exact");
    // A classifier, stopped mid-epoch: 3 epochs of 26 steps (51 batches, 2 per step).
    let (full, cut) = (dir.join("full"), dir.join("cut"));
    run_ok(&mlp_args(&full), &[]);
    let t = run_ok(&mlp_args(&cut), &["--stop-after", "40"]);
    assert!(t.contains("stopped after step 40"), "{t}");
    assert_eq!(newest_checkpoint(&cut).unwrap().0, 40);
    let t = run_ok(&["train".to_string()], &["--resume", s(&cut)]);
    assert!(
        t.contains("resuming") && t.contains("from step 40 of 78"),
        "{t}"
    );
    assert_same_state(&full, &cut);
    let strip = |r: &serde_json::Value| {
        let mut r = r.clone();
        let o = r.as_object_mut().unwrap();
        o.remove("time_s");
        o.remove("samples_per_s");
        r
    };
    let (ra, rb) = (records(&full), records(&cut));
    assert_eq!(ra.len(), rb.len());
    for (a, b) in ra.iter().zip(&rb) {
        assert_eq!(strip(a), strip(b));
    }

    // A language model with dropout (the global RNG's state is in the checkpoint), stopped
    // twice.
    let text_file = dir.join("toy.txt");
    std::fs::write(&text_file, "the cat sat on the mat.\n".repeat(200)).unwrap();
    let cfg = dir.join("gpt.json");
    std::fs::write(
        &cfg,
        r#"{"layers": 1, "width": 16, "heads": 2, "context": 16, "dropout": 0.2}"#,
    )
    .unwrap();
    let lm = |run: &Path| -> Vec<String> {
        [
            "train",
            "--model",
            "gpt",
            "--data",
            s(&text_file),
            "--config",
            s(&cfg),
            "--seq-len",
            "16",
            "--batch-size",
            "8",
            "--steps",
            "30",
            "--eval-every",
            "10",
            "--schedule",
            "warmup-cosine",
            "--out",
            s(run),
            "--no-progress",
        ]
        .iter()
        .map(|x| x.to_string())
        .collect()
    };
    let (full, cut) = (dir.join("lm-full"), dir.join("lm-cut"));
    run_ok(&lm(&full), &[]);
    run_ok(&lm(&cut), &["--stop-after", "7"]);
    run_ok(
        &["train".to_string()],
        &["--resume", s(&cut), "--stop-after", "19"],
    );
    let t = run_ok(&["train".to_string()], &["--resume", s(&cut)]);
    assert!(t.contains("from step 19"), "{t}");
    assert_same_state(&full, &cut);
    assert_eq!(
        tensors(&full.join("model.safetensors")),
        tensors(&cut.join("model.safetensors"))
    );
    std::fs::remove_dir_all(dir).ok();
}

/// A small deterministic generator for the kill times.
struct Lcg(u64);

impl Lcg {
    fn below(&mut self, n: u64) -> u64 {
        self.0 = self
            .0
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (self.0 >> 33) % n
    }
}

#[test]
fn kill_9_at_random_moments_leaves_a_loadable_checkpoint_and_resume_is_exact() {
    let dir = tmp("kill");
    // Enough epochs (about 4 s of training here) that the 15 runs of up to 0.4 s below are
    // mostly killed before the whole run is done.
    let args = |run: &Path| -> Vec<String> {
        [
            "train",
            "--model",
            "mlp",
            "--epochs",
            "16",
            "--checkpoint-every",
            "1",
            "--eval-every",
            "7",
            "--out",
            s(run),
            "--no-progress",
        ]
        .iter()
        .map(|x| x.to_string())
        .collect()
    };
    let (full, run) = (dir.join("full"), dir.join("killed"));
    run_ok(&args(&full), &[]);
    let mut rng = Lcg(2026);
    let mut kills = 0;
    let mut steps_seen = Vec::new();
    for round in 0..15 {
        let resume = newest_checkpoint(&run).is_some();
        let mut a: Vec<String> = if resume {
            vec!["train".into(), "--resume".into(), s(&run).into()]
        } else {
            args(&run)
        };
        a.push("--quiet".into());
        let mut child = spawn(&a.iter().map(String::as_str).collect::<Vec<_>>());
        std::thread::sleep(Duration::from_millis(20 + rng.below(400)));
        let finished = child.try_wait().unwrap().is_some();
        child.kill().ok(); // SIGKILL
        let status = child.wait().unwrap();
        if !finished && !status.success() {
            kills += 1;
        }
        // Whatever the moment, the newest checkpoint reads back whole and names its step.
        if let Some((step, path)) = newest_checkpoint(&run) {
            let (t, meta) = load_safetensors(&path)
                .unwrap_or_else(|e| panic!("round {round}: {}: {e}", path.display()));
            assert_eq!(meta["nerve.step"], step.to_string(), "round {round}");
            assert!(t.keys().any(|k| k.starts_with("model/")));
            assert!(t.keys().any(|k| k.starts_with("optimizer/")));
            steps_seen.push(step);
            // model.safetensors is written after the step checkpoint: never ahead of it.
            let (_, mmeta) = load_safetensors(run.join("model.safetensors")).unwrap();
            assert!(mmeta["nerve.step"].parse::<usize>().unwrap() <= step);
        }
    }
    assert!(kills >= 10, "only {kills} runs were killed mid-way");
    assert!(
        steps_seen.windows(2).any(|w| w[1] > w[0]),
        "the run never advanced: {steps_seen:?}"
    );
    let t = run_ok(&["train".to_string()], &["--resume", s(&run)]);
    assert!(t.contains("done:") || t.contains("nothing to do"), "{t}");
    assert_same_state(&full, &run);
    std::fs::remove_dir_all(dir).ok();
}

#[test]
fn sigterm_finishes_the_step_saves_and_resume_is_exact() {
    let dir = tmp("sigterm");
    let args = |run: &Path| -> Vec<String> {
        [
            "train",
            "--model",
            "mlp",
            "--epochs",
            "40",
            "--out",
            s(run),
            "--no-progress",
        ]
        .iter()
        .map(|x| x.to_string())
        .collect()
    };
    let (full, run) = (dir.join("full"), dir.join("term"));
    let child = spawn(&args(&run).iter().map(String::as_str).collect::<Vec<_>>());
    // Wait for the first metrics record, then ask it to stop.
    let t0 = Instant::now();
    while !std::fs::read_to_string(run.join("metrics.jsonl")).is_ok_and(|m| m.contains("train")) {
        assert!(t0.elapsed() < Duration::from_secs(60), "no progress");
        std::thread::sleep(Duration::from_millis(5));
    }
    let killed = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(killed.success());
    let out = child.wait_with_output().unwrap();
    let t = text(&out);
    assert_eq!(out.status.code(), Some(143), "{t}");
    assert!(
        t.contains("interrupted by signal 15") && t.contains("--resume"),
        "{t}"
    );
    let (step, _) = newest_checkpoint(&run).expect("a checkpoint at the stop");
    assert!(step > 0 && step < 40 * 26, "{step}");
    run_ok(&["train".to_string()], &["--resume", s(&run)]);
    run_ok(&args(&full), &[]);
    assert_same_state(&full, &run);
    std::fs::remove_dir_all(dir).ok();
}

#[test]
fn a_diverging_run_stops_naming_the_step_and_parameter_or_skips() {
    let dir = tmp("nan");
    let run = dir.join("run");
    // Adam moves every weight by about lr at the first step: 1e30 overflows the next forward.
    let base = [
        "train",
        "--model",
        "mlp",
        "--epochs",
        "1",
        "--lr",
        "1e30",
        "--checkpoint-every",
        "1",
        "--out",
        s(&run),
        "--no-progress",
    ];
    let o = nerve(&base);
    let t = text(&o);
    assert!(!o.status.success(), "{t}");
    for needle in [
        "step 2: the loss is",
        "the gradient of `",
        "Training stopped",
        "the last good checkpoint is",
        "step-00000001.safetensors",
    ] {
        assert!(t.contains(needle), "`{needle}` not in: {t}");
    }
    assert_eq!(newest_checkpoint(&run).unwrap().0, 1);
    let o = nerve(&[&base[..], &["--on-nonfinite", "skip"]].concat());
    let t = text(&o);
    assert!(!o.status.success(), "{t}");
    assert!(
        t.contains("the step is skipped") && t.contains("10 steps in a row"),
        "{t}"
    );
    let skipped = records(&run)
        .iter()
        .filter(|r| r["kind"] == "skipped")
        .count();
    assert_eq!(skipped, 9, "the tenth stops the run");
    std::fs::remove_dir_all(dir).ok();
}

#[test]
fn early_stopping_best_and_kept_checkpoints_plots_and_output_modes() {
    let dir = tmp("early");
    let run = dir.join("run");
    // No improvement can reach min-delta 100: the first evaluation is the best, and two more
    // without improvement stop the run after epoch 3 of 10.
    let o = nerve(&[
        "train",
        "--model",
        "mlp",
        "--epochs",
        "10",
        "--early-stopping",
        "2",
        "--min-delta",
        "100",
        "--checkpoint-every",
        "1",
        "--keep-checkpoints",
        "2",
        "--out",
        s(&run),
        "--json",
    ]);
    let t = text(&o);
    assert!(o.status.success(), "{t}");
    let stdout = String::from_utf8_lossy(&o.stdout);
    let lines: Vec<serde_json::Value> = stdout
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON: {l}: {e}")))
        .collect();
    assert!(lines.iter().all(|r| r["kind"].is_string()));
    assert_eq!(lines, records(&run), "--json prints the records");
    let evals: Vec<&serde_json::Value> = lines.iter().filter(|r| r["kind"] == "eval").collect();
    assert_eq!(evals.len(), 3);
    assert_eq!(evals[2]["epoch"], 3.0);
    let cks: Vec<_> = std::fs::read_dir(run.join("checkpoints"))
        .unwrap()
        .collect();
    assert_eq!(cks.len(), 2, "--keep-checkpoints 2");
    let (_, best) = load_safetensors(run.join("best.safetensors")).unwrap();
    assert_eq!(best["nerve.step"], "26");
    for f in [
        "loss.png",
        "accuracy.png",
        "lr.png",
        "config.json",
        "model.safetensors",
    ] {
        assert!(run.join(f).is_file(), "{f}");
    }
    let png = std::fs::read(run.join("loss.png")).unwrap();
    assert_eq!(&png[..8], b"\x89PNG\r\n\x1a\n");
    // The TensorBoard event file holds the same records, tagged `<kind>/<name>`.
    let events: Vec<PathBuf> = std::fs::read_dir(&run)
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.to_string_lossy().contains("events.out.tfevents."))
        .collect();
    assert_eq!(events.len(), 1, "{events:?}");
    let ev = std::fs::read(&events[0]).unwrap();
    let count = |tag: &[u8]| ev.windows(tag.len()).filter(|w| *w == tag).count();
    assert_eq!(count(b"eval/val_accuracy"), 3);
    assert_eq!(
        count(b"train/loss"),
        lines.iter().filter(|r| r["kind"] == "train").count()
    );
    let train = lines.iter().find(|r| r["kind"] == "train").unwrap();
    for k in [
        "step",
        "epoch",
        "loss",
        "lr",
        "grad_norm",
        "samples_per_s",
        "accuracy",
        "time_s",
    ] {
        assert!(train[k].is_number(), "train record lacks {k}: {train}");
    }

    // The report: config, metrics, plots and the confusion matrix of the best checkpoint.
    let o = nerve(&["report", s(&run)]);
    assert!(o.status.success(), "{}", text(&o));
    let md = std::fs::read_to_string(run.join("report.md")).unwrap();
    for needle in [
        "# Run report: mlp",
        "![loss](loss.png)",
        "Confusion matrix",
        "best val",
    ] {
        assert!(md.contains(needle), "`{needle}` not in report.md:\n{md}");
    }
    let o = nerve(&["report", s(&run), "--format", "html"]);
    assert!(o.status.success(), "{}", text(&o));
    let html = std::fs::read_to_string(run.join("report.html")).unwrap();
    assert!(
        html.starts_with("<!DOCTYPE html>") && html.contains("<img"),
        "{html}"
    );

    // --quiet: only the result lines; a fresh run replaces the old one's files.
    let o = nerve(&[
        "train",
        "--model",
        "mlp",
        "--epochs",
        "1",
        "--out",
        s(&run),
        "--quiet",
    ]);
    let stdout = String::from_utf8_lossy(&o.stdout).to_string();
    assert!(o.status.success(), "{}", text(&o));
    assert!(stdout.lines().all(|l| l.starts_with("done:")), "{stdout}");
    assert_eq!(
        records(&run).iter().filter(|r| r["kind"] == "eval").count(),
        1
    );
    std::fs::remove_dir_all(dir).ok();
}

#[test]
fn results_are_the_same_bits_on_one_thread_or_two() {
    let dir = tmp("threads");
    // Convolutions (weight gradients summed over runs of samples), LayerNorm (over rows),
    // attention and GEMMs.
    for model in ["cnn", "vit"] {
        let runs: Vec<PathBuf> = ["1", "2"]
            .iter()
            .map(|t| {
                let run = dir.join(format!("{model}-{t}"));
                let o = nerve(&[
                    "--threads",
                    t,
                    "train",
                    "--model",
                    model,
                    "--epochs",
                    "1",
                    "--out",
                    s(&run),
                    "--quiet",
                ]);
                assert!(o.status.success(), "{}", text(&o));
                run
            })
            .collect();
        assert_same_state(&runs[0], &runs[1]);
    }
    std::fs::remove_dir_all(dir).ok();
}

//! `mpirun -np 2 nerve train --distributed`: two ranks with batch B equal one process with
//! batch 2B, a run resumes on another number of ranks, and a dead rank stops the job.
//! Needs a nerve built with `--features mpi` and Open MPI's `mpirun` (`.ci/run` installs it).
#![cfg(feature = "mpi")]

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use nerve_nn::checkpoint::load_safetensors;

/// `mpirun -np <np> nerve <args>`, allowed to run as root (CI containers), with a time limit
/// so that a hang fails the test instead of blocking it.
fn mpirun(np: usize) -> Command {
    let mut c = Command::new("mpirun");
    c.env("OMPI_ALLOW_RUN_AS_ROOT", "1")
        .env("OMPI_ALLOW_RUN_AS_ROOT_CONFIRM", "1")
        .args(["--oversubscribe", "--timeout", "300", "-np"])
        .arg(np.to_string())
        .arg(env!("CARGO_BIN_EXE_nerve"));
    c
}

fn run(mut c: Command, args: &[&str]) -> Output {
    let o = c.args(args).output().expect("start the command");
    assert!(o.status.success(), "{args:?} failed: {}", text(&o));
    o
}

fn nerve() -> Command {
    Command::new(env!("CARGO_BIN_EXE_nerve"))
}

fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

fn tmp(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("nerve-ddp-test-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// The processes whose parent is `pid` (from /proc), in pid order.
fn children(pid: u32) -> Vec<u32> {
    let mut out: Vec<u32> = std::fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter_map(|e| {
            let p: u32 = e.file_name().to_str()?.parse().ok()?;
            let stat = std::fs::read_to_string(e.path().join("stat")).ok()?;
            // `pid (comm) state ppid …`: the command may hold spaces, so split after `)`.
            let ppid: u32 = stat
                .rsplit_once(')')?
                .1
                .split_whitespace()
                .nth(1)?
                .parse()
                .ok()?;
            (ppid == pid).then_some(p)
        })
        .collect();
    out.sort_unstable();
    out
}

/// A small text for the language models.
fn corpus(dir: &Path) -> PathBuf {
    let lines = [
        "the cat sat on the mat and looked at the dog.",
        "a dog ran in the park; the cat did not care.",
        "rain fell on the roof all night long, softly.",
        "who knows what the morning will bring to us?",
    ];
    let text: String = (0..400)
        .map(|i| format!("{} {}\n", lines[i % 4], i % 7))
        .collect();
    let p = dir.join("text.txt");
    std::fs::write(&p, text).unwrap();
    p
}

/// `nerve train` of a small LSTM on `data` for 20 steps, evaluating every `eval_every`.
fn lstm_args<'a>(data: &'a Path, eval_every: &'a str) -> Vec<&'a str> {
    vec![
        "train",
        "--model",
        "lstm",
        "--data",
        s(data),
        "--seq-len",
        "24",
        "--steps",
        "20",
        "--eval-every",
        eval_every,
        "--eval-windows",
        "4",
    ]
}

/// The largest relative difference `‖a − b‖ / ‖b‖` over the tensors of two model files.
fn max_relative_difference(a: &Path, b: &Path) -> f64 {
    let (ta, _) = load_safetensors(a).unwrap();
    let (tb, _) = load_safetensors(b).unwrap();
    assert_eq!(ta.len(), tb.len());
    let mut worst = 0.0f64;
    for (name, x) in &ta {
        let y = &tb[name];
        let (x, y) = (x.to_f64_vec(), y.to_f64_vec());
        let diff: f64 = x.iter().zip(&y).map(|(p, q)| (p - q).powi(2)).sum::<f64>();
        let norm: f64 = y.iter().map(|q| q * q).sum::<f64>();
        worst = worst.max((diff / norm.max(1e-30)).sqrt());
    }
    worst
}

#[test]
fn two_ranks_with_batch_b_equal_one_process_with_batch_2b() {
    let dir = tmp("equal");
    let data = corpus(&dir);
    // A classifier (sharded data loader, Adam) and a language model (sharded windows,
    // gradient clipping), 20 optimizer steps each.
    let cases: [(&str, Vec<&str>, &str); 2] = [
        (
            "mlp",
            vec![
                "train",
                "--model",
                "mlp",
                "--epochs",
                "1",
                "--stop-after",
                "20",
                "--eval-every",
                "10",
            ],
            "16",
        ),
        ("lstm", lstm_args(&data, "10"), "4"),
    ];
    for (name, args, b) in cases {
        let two = dir.join(format!("{name}-2"));
        let one = dir.join(format!("{name}-1"));
        let b2 = (2 * b.parse::<usize>().unwrap()).to_string();
        let o = run(
            mpirun(2),
            &[
                &args[..],
                &["--distributed", "--batch-size", b, "--out", s(&two)],
            ]
            .concat(),
        );
        // Rank 0 alone prints and writes.
        let t = text(&o);
        assert_eq!(t.matches("training ").count(), 1, "{t}");
        run(
            nerve(),
            &[&args[..], &["--batch-size", &b2, "--out", s(&one)]].concat(),
        );
        let d = max_relative_difference(
            &two.join("model.safetensors"),
            &one.join("model.safetensors"),
        );
        assert!(d < 1e-5, "{name}: relative difference {d}");
        let cfg = std::fs::read_to_string(two.join("config.json")).unwrap();
        assert!(cfg.contains("\"world_size\": 2"), "{cfg}");
    }
}

#[test]
fn a_run_resumes_on_another_number_of_ranks() {
    let dir = tmp("resume");
    let data = corpus(&dir);
    let args = lstm_args(&data, "5");
    let whole = dir.join("whole");
    run(
        nerve(),
        &[&args[..], &["--batch-size", "8", "--out", s(&whole)]].concat(),
    );
    // Two ranks of 4 stop at step 10; one process continues with the batch of 8.
    let a = dir.join("two-then-one");
    run(
        mpirun(2),
        &[
            &args[..],
            &[
                "--distributed",
                "--batch-size",
                "4",
                "--stop-after",
                "10",
                "--out",
                s(&a),
            ],
        ]
        .concat(),
    );
    let o = run(nerve(), &["train", "--resume", s(&a)]);
    assert!(text(&o).contains("done: 20 steps"), "{}", text(&o));
    // One process of 8 stops at step 10; two ranks of 4 continue.
    let b = dir.join("one-then-two");
    run(
        nerve(),
        &[
            &args[..],
            &["--batch-size", "8", "--stop-after", "10", "--out", s(&b)],
        ]
        .concat(),
    );
    run(mpirun(2), &["train", "--resume", s(&b), "--distributed"]);
    for run in [&a, &b] {
        let d = max_relative_difference(
            &run.join("model.safetensors"),
            &whole.join("model.safetensors"),
        );
        assert!(d < 1e-5, "{}: relative difference {d}", run.display());
        let metrics = std::fs::read_to_string(run.join("metrics.jsonl")).unwrap();
        let evals = metrics.lines().filter(|l| l.contains("\"eval\"")).count();
        assert_eq!(evals, 4, "{metrics}");
    }
    // Two ranks without --distributed would train alone into one folder: refused.
    let o = mpirun(2)
        .args([
            "train",
            "--model",
            "mlp",
            "--epochs",
            "1",
            "--out",
            s(&dir.join("alone")),
        ])
        .output()
        .unwrap();
    assert!(!o.status.success());
    assert!(text(&o).contains("without --distributed"), "{}", text(&o));
    // A batch that does not divide among the ranks is refused, naming both.
    let c = dir.join("odd");
    run(
        nerve(),
        &[
            &args[..],
            &["--batch-size", "3", "--stop-after", "5", "--out", s(&c)],
        ]
        .concat(),
    );
    let o = mpirun(2)
        .args(["train", "--resume", s(&c), "--distributed"])
        .output()
        .unwrap();
    assert!(!o.status.success());
    assert!(
        text(&o).contains("does not divide among 2 ranks"),
        "{}",
        text(&o)
    );
}

#[test]
fn a_dead_rank_stops_the_job_instead_of_hanging() {
    let dir = tmp("dead");
    let data = corpus(&dir);
    let run_dir = dir.join("run");
    let mut child = mpirun(2)
        .args([
            "train",
            "--model",
            "lstm",
            "--data",
            s(&data),
            "--seq-len",
            "24",
            "--steps",
            "100000",
            "--log-every",
            "1",
            "--distributed",
            "--no-progress",
            "--out",
            s(&run_dir),
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start mpirun");
    // Wait until both ranks train (rank 0 has written a few records).
    let t0 = Instant::now();
    while std::fs::read_to_string(run_dir.join("metrics.jsonl")).map_or(0, |m| m.lines().count())
        < 3
    {
        assert!(
            t0.elapsed() < Duration::from_secs(120),
            "training did not start"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    // The ranks are mpirun's children; kill the second.
    let pids = children(child.id());
    assert_eq!(pids.len(), 2, "ranks: {pids:?}");
    let st = Command::new("sh")
        .args(["-c", &format!("kill -9 {}", pids[1])])
        .status()
        .unwrap();
    assert!(st.success());
    let killed = Instant::now();
    let status = loop {
        if let Some(st) = child.try_wait().unwrap() {
            break st;
        }
        assert!(
            killed.elapsed() < Duration::from_secs(60),
            "the job still runs 60 s after a rank died"
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    let o = child.wait_with_output().unwrap();
    let t = text(&o);
    assert!(!status.success(), "{t}");
    assert!(t.contains("signal 9"), "{t}");
}

#[test]
fn every_model_of_the_zoo_trains_on_two_ranks() {
    let dir = tmp("zoo");
    let data = corpus(&dir);
    for model in ["mlp", "cnn", "vit", "lstm", "gru", "gpt", "mamba", "ddpm"] {
        let out = dir.join(model);
        let mut args = vec![
            "train",
            "--distributed",
            "--model",
            model,
            "--log-every",
            "1",
            "--out",
            s(&out),
        ];
        match model {
            "mlp" | "cnn" | "vit" => args.extend(["--epochs", "1", "--stop-after", "3"]),
            "ddpm" => args.extend(["--data", "digits", "--steps", "3", "--batch-size", "16"]),
            _ => args.extend([
                "--data",
                s(&data),
                "--steps",
                "3",
                "--batch-size",
                "4",
                "--seq-len",
                "32",
                "--eval-windows",
                "4",
            ]),
        }
        let o = run(mpirun(2), &args);
        let t = text(&o);
        assert!(
            t.contains("data parallel over 2 ranks") && t.contains("MB of gradients"),
            "{model}: {t}"
        );
        assert!(out.join("model.safetensors").is_file(), "{model}");
        let metrics = std::fs::read_to_string(out.join("metrics.jsonl")).unwrap();
        assert!(metrics.contains("\"allreduce_ms\""), "{model}: {metrics}");
    }
}

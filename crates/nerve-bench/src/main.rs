//! `nerve-bench`: runs the benchmark workloads and prints one line each,
//! `workload=<name> impl=nerve step_ms=<median> throughput=<value> unit=<unit>` (a workload
//! with a second implementation, such as `smollm2-generate` with quantised weights, prints a
//! second line with its own `impl=`).
//!
//! Protocol (shared with `tools/bench/torch_bench.py`): 3 warm-up steps, then steps until at least
//! `--min-secs` seconds have been timed; the median step time is reported. Every line (every
//! workload and impl) runs alone in a child process of its own, so its ` peak_rss_mb=` is that
//! workload's peak resident memory and not what an earlier workload left behind.

use std::time::{Duration, Instant};

/// mimalloc keeps freed blocks for reuse: per-step tensors then cost no page faults or
/// kernel zeroing (glibc returns large blocks to the OS and maps them again every step).
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

use clap::Parser;
use nerve_core::{manual_seed, Result, Tensor};
use nerve_nn::{
    loss, Adam, Embedding, Linear, Module, ModuleExt, Optimizer, RnnOptions, Sequential,
};

#[derive(Parser)]
#[command(about = "nerve benchmark workloads")]
struct Args {
    /// Workloads to run (default: all). Known: see --list.
    workloads: Vec<String>,
    /// Minimum timed seconds per workload.
    #[arg(long, default_value_t = 3.0)]
    min_secs: f64,
    /// List the workloads and exit.
    #[arg(long)]
    list: bool,
    /// Threads (default: NERVE_NUM_THREADS or all cores).
    #[arg(long)]
    threads: Option<usize>,
    /// Run the selected workloads one after another in this process instead of one child
    /// process each (no ` peak_rss_mb=`: the peak would mix workloads).
    #[arg(long)]
    in_process: bool,
    /// Internal: run the line with this index (of the full list) in this process and report
    /// its peak memory; the parent passes it to each child.
    #[arg(long, hide = true)]
    line: Option<usize>,
}

/// One timed step of a workload.
type Step = Box<dyn FnMut() -> Result<()>>;

/// A workload: prepares its state and returns a step closure plus the work per step.
struct Workload {
    name: &'static str,
    /// The `impl=` label: `nerve`, or a variant of it on a second line of the same workload.
    impl_name: &'static str,
    unit: &'static str,
    /// Work units per step (e.g. GFLOP); throughput = work / step seconds.
    work: f64,
    setup: fn() -> Result<Step>,
}

fn sgemm(n: usize) -> Result<Step> {
    manual_seed(0);
    let a = Tensor::randn([n, n]);
    let b = Tensor::randn([n, n]);
    Ok(Box::new(move || {
        std::hint::black_box(a.matmul(&b)?);
        Ok(())
    }))
}

const EW_N: usize = 1 << 24;

/// A training step of `model` on one fixed random batch: forward, cross-entropy, backward,
/// AdamW update, zeroing of gradients.
fn train_step(
    model: Sequential,
    x: Tensor,
    classes: i64,
    lr: f64,
    weight_decay: f64,
) -> Result<Step> {
    let n = x.dims()[0];
    let y = Tensor::from_vec(
        (0..n as i64).map(|i| (i * 7) % classes).collect::<Vec<_>>(),
        [n],
    )?;
    let mut opt = Adam::adamw(model.parameters(), lr, weight_decay);
    Ok(Box::new(move || {
        let l = loss::cross_entropy(&model.forward(&x)?, &y, &Default::default())?;
        l.backward()?;
        opt.step()?;
        opt.zero_grad();
        std::hint::black_box(l);
        Ok(())
    }))
}

fn workloads() -> Vec<Workload> {
    vec![
        // 784→512→ReLU→512→ReLU→10, batch 128, AdamW lr 1e-3 wd 0.01.
        Workload {
            name: "mlp",
            impl_name: "nerve",
            unit: "samples/s",
            work: 128.0,
            setup: || {
                manual_seed(0);
                train_step(
                    nerve_models::mlp(784, &[512, 512], 10)?,
                    Tensor::randn([128, 784]),
                    10,
                    1e-3,
                    0.01,
                )
            },
        },
        // Decoder-only Transformer (vocab 65, context 128, 4 layers, 4 heads, width 128),
        // batch 16 × 128 tokens, AdamW lr 3e-4.
        Workload {
            name: "gpt",
            impl_name: "nerve",
            unit: "tokens/s",
            work: 16.0 * 128.0,
            setup: || {
                manual_seed(0);
                let model = nerve_models::Gpt::new(nerve_models::GptConfig::default())?;
                let ids: Vec<i64> = (0..16 * 128).map(|i| (i * 7 + i / 13) % 65).collect();
                let targets: Vec<i64> = ids.iter().map(|v| (v + 1) % 65).collect();
                let ids = Tensor::from_vec(ids, [16, 128])?;
                let targets = Tensor::from_vec(targets, [16 * 128])?;
                let mut opt = Adam::adamw(model.parameters(), 3e-4, 0.01);
                Ok(Box::new(move || {
                    let logits = model.forward(&ids)?.reshape(&[-1, 65])?;
                    let l = loss::cross_entropy(&logits, &targets, &Default::default())?;
                    l.backward()?;
                    opt.step()?;
                    opt.zero_grad();
                    Ok(())
                }))
            },
        },
        // ViT on 3×32×32 (patch 4, width 128, 4 layers, 4 heads), batch 32, AdamW lr 1e-3.
        Workload {
            name: "vit",
            impl_name: "nerve",
            unit: "samples/s",
            work: 32.0,
            setup: || {
                manual_seed(0);
                let model = nerve_models::Vit::new(nerve_models::VitConfig::default())?;
                let seq = Sequential::new().add(model);
                train_step(seq, Tensor::randn([32, 3, 32, 32]), 10, 1e-3, 0.01)
            },
        },
        // Char LM: embedding 64, 1-layer LSTM 256, linear to 65; batch 32 × 64, AdamW lr 1e-3.
        Workload {
            name: "lstm",
            impl_name: "nerve",
            unit: "tokens/s",
            work: 32.0 * 64.0,
            setup: || {
                manual_seed(0);
                let emb = Embedding::new(65, 64)?;
                let rnn = nerve_nn::lstm(
                    64,
                    256,
                    RnnOptions {
                        batch_first: true,
                        ..Default::default()
                    },
                )?;
                let head = Linear::new(256, 65, true)?;
                let ids: Vec<i64> = (0..32 * 64).map(|i| (i * 7 + i / 13) % 65).collect();
                let targets: Vec<i64> = ids.iter().map(|v| (v + 1) % 65).collect();
                let ids = Tensor::from_vec(ids, [32, 64])?;
                let targets = Tensor::from_vec(targets, [32 * 64])?;
                let mut params = emb.parameters();
                params.extend(rnn.parameters());
                params.extend(head.parameters());
                let mut opt = Adam::adamw(params, 1e-3, 0.01);
                Ok(Box::new(move || {
                    let h = rnn.forward(&emb.forward(&ids)?)?;
                    let logits = head.forward(&h)?.reshape(&[-1, 65])?;
                    let l = loss::cross_entropy(&logits, &targets, &Default::default())?;
                    l.backward()?;
                    opt.step()?;
                    opt.zero_grad();
                    Ok(())
                }))
            },
        },
        // Mamba LM (vocab 65, width 128, 4 layers, d_state 16, expand 2, d_conv 4),
        // batch 8 × 128, AdamW lr 1e-3.
        Workload {
            name: "mamba",
            impl_name: "nerve",
            unit: "tokens/s",
            work: 8.0 * 128.0,
            setup: || {
                manual_seed(0);
                let model = nerve_models::MambaLm::new(nerve_models::MambaConfig::default())?;
                let ids: Vec<i64> = (0..8 * 128).map(|i| (i * 7 + i / 13) % 65).collect();
                let targets: Vec<i64> = ids.iter().map(|v| (v + 1) % 65).collect();
                let ids = Tensor::from_vec(ids, [8, 128])?;
                let targets = Tensor::from_vec(targets, [8 * 128])?;
                let mut opt = Adam::adamw(model.parameters(), 1e-3, 0.01);
                Ok(Box::new(move || {
                    let logits = model.forward(&ids)?.reshape(&[-1, 65])?;
                    let l = loss::cross_entropy(&logits, &targets, &Default::default())?;
                    l.backward()?;
                    opt.step()?;
                    opt.zero_grad();
                    Ok(())
                }))
            },
        },
        // The small CNN on 1×28×28, batch 64, AdamW lr 1e-3 (PyTorch's default decay 0.01).
        Workload {
            name: "cnn",
            impl_name: "nerve",
            unit: "samples/s",
            work: 64.0,
            setup: || {
                manual_seed(0);
                train_step(
                    nerve_models::cnn(&[1, 28, 28], 10)?,
                    Tensor::randn([64, 1, 28, 28]),
                    10,
                    1e-3,
                    0.01,
                )
            },
        },
        Workload {
            name: "sgemm-1024",
            impl_name: "nerve",
            unit: "GFLOP/s",
            work: 2.0 * 1024f64.powi(3) / 1e9,
            setup: || sgemm(1024),
        },
        Workload {
            name: "sgemm-4096",
            impl_name: "nerve",
            unit: "GFLOP/s",
            work: 2.0 * 4096f64.powi(3) / 1e9,
            setup: || sgemm(4096),
        },
        // c = a + b over 16M f32: 3 × 64 MiB of memory traffic per step.
        Workload {
            name: "add-16m",
            impl_name: "nerve",
            unit: "GB/s",
            work: 3.0 * 4.0 * EW_N as f64 / 1e9,
            setup: || {
                let a = Tensor::randn([EW_N]);
                let b = Tensor::randn([EW_N]);
                Ok(Box::new(move || {
                    std::hint::black_box(a.add(&b)?);
                    Ok(())
                }))
            },
        },
        // GELU (tanh form, as GPT-2 uses) over 16M f32.
        Workload {
            name: "gelu-16m",
            impl_name: "nerve",
            unit: "Gelem/s",
            work: EW_N as f64 / 1e9,
            setup: || {
                let a = Tensor::randn([EW_N]);
                Ok(Box::new(move || {
                    std::hint::black_box(a.gelu_tanh()?);
                    Ok(())
                }))
            },
        },
        // GPT-2 small (124M) with random weights: 16 prompt tokens, 64 greedy new tokens with
        // the key/value cache.
        Workload {
            name: "gpt2-generate",
            impl_name: "nerve",
            unit: "new_tokens/s",
            work: 64.0,
            setup: || {
                manual_seed(0);
                let model = nerve_core::no_grad(|| {
                    nerve_models::Gpt::new(nerve_models::GptConfig {
                        vocab_size: 50257,
                        context: 1024,
                        layers: 12,
                        heads: 12,
                        width: 768,
                        dropout: 0.0,
                    })
                })?;
                let prompt: Vec<i64> = (0..16).map(|i| (i * 7919) % 50257).collect();
                Ok(Box::new(move || {
                    let out = model.generate(&prompt, 64, 0.0, 0)?;
                    std::hint::black_box(out);
                    Ok(())
                }))
            },
        },
        // SmolLM2-135M-Instruct from its GGUF file with the weights left in their blocks
        // (Q4_1 projections, Q8_0 embedding and tied output): the same steps as the f32 line
        // below.
        Workload {
            name: "smollm2-generate",
            impl_name: "nerve-q4_1",
            unit: "new_tokens/s",
            work: 64.0,
            setup: || {
                let (model, tok) = nerve_models::gguf::load_llama_quantized(smollm2_file())
                    .map_err(|e| not_fetched("smollm2-generate", SMOLLM2, e))?;
                let prompt = smollm2_prompt(&tok)?;
                Ok(Box::new(move || {
                    let out = model.generate_with(&prompt, 64, &[], greedy, |_| Ok(()))?;
                    std::hint::black_box(out);
                    Ok(())
                }))
            },
        },
        // SmolLM2-135M-Instruct from its GGUF file, dequantised to f32: the 5 tokens of "The
        // capital of France is", then 64 greedy new tokens with the key/value cache.
        Workload {
            name: "smollm2-generate",
            impl_name: "nerve",
            unit: "new_tokens/s",
            work: 64.0,
            setup: || {
                let (model, tok) = nerve_models::gguf::load_llama(smollm2_file())
                    .map_err(|e| not_fetched("smollm2-generate", SMOLLM2, e))?;
                let prompt = smollm2_prompt(&tok)?;
                Ok(Box::new(move || {
                    let out = model.generate_with(&prompt, 64, &[], greedy, |_| Ok(()))?;
                    std::hint::black_box(out);
                    Ok(())
                }))
            },
        },
        // all-MiniLM-L6-v2: 32 sequences of 128 seeded random ids, full attention mask;
        // forward, mean pooling, L2 normalisation, no gradients.
        Workload {
            name: "minilm-embed",
            impl_name: "nerve",
            unit: "sequences/s",
            work: 32.0,
            setup: || {
                let (model, _) = nerve_models::load_sentence_encoder(data_file(MINILM.0, MINILM.2))
                    .map_err(|e| not_fetched("minilm-embed", MINILM, e))?;
                let mut rng = nerve_core::random::Generator::new(0);
                let ids: Vec<i64> = (0..32 * 128)
                    .map(|i| match i % 128 {
                        0 => 101,
                        127 => 102,
                        _ => 1000 + rng.below(29000) as i64,
                    })
                    .collect();
                let ids = Tensor::from_vec(ids, [32, 128])?;
                let mask = Tensor::ones([32, 128]).to_dtype(nerve_core::DType::I64)?;
                Ok(Box::new(move || {
                    let e = nerve_core::no_grad(|| -> Result<Tensor> {
                        let h = model.forward_masked(&ids, &mask, None)?;
                        nerve_models::bert::l2_normalize(&nerve_models::bert::mean_pool(&h, &mask)?)
                    })?;
                    std::hint::black_box(e);
                    Ok(())
                }))
            },
        },
        // SmolLM2-135M f32 base, frozen; LoRA rank 8, alpha 16 on q_proj and v_proj of every
        // layer; batch 4 × 128 seeded random ids, causal LM loss on every position, AdamW lr
        // 1e-4 on the adapters. The whole step: forward, loss, backward, update, zeroing.
        Workload {
            name: "lora-finetune",
            impl_name: "nerve",
            unit: "tokens/s",
            work: 4.0 * 128.0,
            setup: || {
                let (model, _) = nerve_models::gguf::load_llama(smollm2_file())
                    .map_err(|e| not_fetched("lora-finetune", SMOLLM2, e))?;
                manual_seed(0);
                let config = nerve_nn::LoraConfig::new(8, 16.0, &["q_proj", "v_proj"]);
                nerve_nn::lora::apply(&model, &config)
                    .map_err(|e| nerve_core::Error::invalid("lora-finetune", e.to_string()))?;
                let mut rng = nerve_core::random::Generator::new(0);
                let vocab = model.config().vocab_size as u64;
                let ids: Vec<i64> = (0..4 * 128).map(|_| rng.below(vocab) as i64).collect();
                let ids = Tensor::from_vec(ids, [4, 128])?;
                let mut opt = Adam::adamw(model.trainable_parameters(), 1e-4, 0.01);
                model.train();
                Ok(Box::new(move || {
                    let l = nerve_models::causal_lm_loss(&model.forward(&ids)?, &ids)?;
                    l.backward()?;
                    opt.step()?;
                    opt.zero_grad();
                    std::hint::black_box(l);
                    Ok(())
                }))
            },
        },
        // Softmax over the last dim of 4096 rows of 1024 (attention-sized rows).
        Workload {
            name: "softmax-4096x1024",
            impl_name: "nerve",
            unit: "Gelem/s",
            work: 4096.0 * 1024.0 / 1e9,
            setup: || {
                let a = Tensor::randn([4096, 1024]);
                Ok(Box::new(move || {
                    std::hint::black_box(a.softmax(-1)?);
                    Ok(())
                }))
            },
        },
    ]
}

/// A fetched model: the environment variable naming it, its `nerve data get` name and its
/// place under the data folder.
type Fetched = (&'static str, &'static str, &'static str);
const SMOLLM2: Fetched = (
    "NERVE_SMOLLM2_GGUF",
    "smollm2",
    "smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
);
const MINILM: Fetched = ("NERVE_MINILM_DIR", "minilm", "minilm");

/// The SmolLM2 GGUF file.
fn smollm2_file() -> std::path::PathBuf {
    data_file(SMOLLM2.0, SMOLLM2.2)
}

/// `workload`'s error for a model that did not load, saying how to fetch it.
fn not_fetched(
    workload: &'static str,
    (var, name, _): Fetched,
    e: impl std::fmt::Display,
) -> nerve_core::Error {
    nerve_core::Error::invalid(
        workload,
        format!("{e} (run `nerve data get {name}` or set {var})"),
    )
}

/// The ids of the smollm2-generate prompt.
fn smollm2_prompt(tok: &nerve_data::Tokenizer) -> Result<Vec<i64>> {
    Ok(tok
        .encode("The capital of France is", true)
        .map_err(|e| nerve_core::Error::invalid("smollm2-generate", e.to_string()))?
        .into_iter()
        .map(i64::from)
        .collect())
}

/// Greedy choice: the index of the largest logit.
fn greedy(l: &[f32], _seen: &[i64]) -> i64 {
    (0..l.len())
        .max_by(|&a, &b| l[a].total_cmp(&l[b]))
        .unwrap_or(0) as i64
}

/// The process's peak resident memory in MB (`VmHWM` of /proc/self/status), if readable.
fn peak_rss_mb() -> Option<f64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb / 1024.0)
}

/// A fetched model file: `$var`, else `rel` under where `nerve data get` puts things
/// (`$NERVE_DATA_DIR`, else `~/.cache/nerve/data`).
fn data_file(var: &str, rel: &str) -> std::path::PathBuf {
    if let Some(p) = std::env::var_os(var) {
        return p.into();
    }
    let root = std::env::var_os("NERVE_DATA_DIR").map_or_else(
        || {
            std::path::PathBuf::from(std::env::var_os("HOME").unwrap_or_default())
                .join(".cache/nerve/data")
        },
        std::path::PathBuf::from,
    );
    root.join(rel)
}

/// Times one workload and prints its line; with `report_rss`, the line ends with the peak
/// resident memory of this process (which then ran nothing else).
fn run(w: &Workload, min_secs: f64, report_rss: bool) -> Result<()> {
    let mut step = (w.setup)()?;
    for _ in 0..3 {
        step()?;
    }
    let mut times = Vec::new();
    let start = Instant::now();
    while start.elapsed() < Duration::from_secs_f64(min_secs) || times.len() < 3 {
        let t = Instant::now();
        step()?;
        times.push(t.elapsed().as_secs_f64());
    }
    times.sort_by(f64::total_cmp);
    let median = times[times.len() / 2];
    let rss = match (report_rss, peak_rss_mb()) {
        (true, Some(mb)) => format!(" peak_rss_mb={mb:.1}"),
        _ => String::new(),
    };
    println!(
        "workload={} impl={} step_ms={:.3} throughput={:.2} unit={}{rss}",
        w.name,
        w.impl_name,
        median * 1e3,
        w.work / median,
        w.unit
    );
    Ok(())
}

fn main() -> std::process::ExitCode {
    keep_freed_memory();
    let args = Args::parse();
    if let Some(t) = args.threads {
        nerve_core::set_num_threads(t);
    }
    let all = workloads();
    if args.list {
        let mut names: Vec<&str> = all.iter().map(|w| w.name).collect();
        names.dedup();
        for name in names {
            println!("{name}");
        }
        return std::process::ExitCode::SUCCESS;
    }
    for name in &args.workloads {
        if !all.iter().any(|w| w.name == name) {
            eprintln!("error: unknown workload '{name}' (see --list)");
            return std::process::ExitCode::FAILURE;
        }
    }
    if let Some(i) = args.line {
        let Some(w) = all.get(i) else {
            eprintln!("error: no benchmark line {i}");
            return std::process::ExitCode::FAILURE;
        };
        return match run(w, args.min_secs, true) {
            Ok(()) => std::process::ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("error: workload {}: {e}", w.name);
                std::process::ExitCode::FAILURE
            }
        };
    }
    eprintln!(
        "# nerve {} threads, sgemm kernel {}, simd {:?}",
        nerve_core::num_threads(),
        nerve_core::kernels::gemm::sgemm_kernel_name(),
        nerve_core::kernels::simd_level()
    );
    let exe = match std::env::current_exe() {
        Ok(exe) => exe,
        Err(e) => {
            eprintln!(
                "error: cannot find this benchmark's executable to run each workload alone: {e}"
            );
            return std::process::ExitCode::FAILURE;
        }
    };
    for (i, w) in all.iter().enumerate() {
        if !(args.workloads.is_empty() || args.workloads.iter().any(|n| n == w.name)) {
            continue;
        }
        if args.in_process {
            if let Err(e) = run(w, args.min_secs, false) {
                eprintln!("error: workload {}: {e}", w.name);
                return std::process::ExitCode::FAILURE;
            }
            continue;
        }
        let mut child = std::process::Command::new(&exe);
        child.args([
            "--line",
            &i.to_string(),
            "--min-secs",
            &args.min_secs.to_string(),
        ]);
        if let Some(t) = args.threads {
            child.args(["--threads", &t.to_string()]);
        }
        match child.status() {
            Ok(status) if status.success() => {}
            Ok(status) => {
                eprintln!(
                    "error: workload {} ({}) failed: {status}",
                    w.name, w.impl_name
                );
                return std::process::ExitCode::FAILURE;
            }
            Err(e) => {
                eprintln!("error: cannot start the child for workload {}: {e}", w.name);
                return std::process::ExitCode::FAILURE;
            }
        }
    }
    std::process::ExitCode::SUCCESS
}

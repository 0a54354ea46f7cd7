//! LoRA adapters: targets, freezing, gradients, merging and PEFT-style files.

use nerve_core::gradcheck::gradcheck;
use nerve_core::{manual_seed, DType, Result, Tensor};
use nerve_nn::lora::{self, LoraConfig, TargetModules, ADAPTER_CONFIG, ADAPTER_WEIGHTS};
use nerve_nn::{
    glob_match, Adam, Dropout, Linear, LoraAdapter, LoraError, Module, ModuleExt, Optimizer, ReLU,
    Sequential,
};

/// A block with PEFT-style names: `attn.q_proj`, `attn.v_proj`, `mlp.0`, `lm_head`.
struct Block {
    attn: Sequential,
    mlp: Sequential,
    lm_head: Linear,
}

impl Block {
    fn new() -> Result<Self> {
        Ok(Self {
            attn: Sequential::new()
                .add(Named::new("q_proj", Linear::new(6, 6, false)?))
                .add(Named::new("v_proj", Linear::new(6, 6, true)?)),
            mlp: Sequential::new().add(Linear::new(6, 8, true)?).add(ReLU),
            lm_head: Linear::new(8, 5, false)?,
        })
    }
}

/// A single child under a chosen name (so names read like a transformer's).
struct Named {
    name: &'static str,
    inner: Linear,
}

impl Named {
    fn new(name: &'static str, inner: Linear) -> Self {
        Self { name, inner }
    }
}

impl Module for Named {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.inner.forward(x)
    }
    fn children(&self) -> Vec<(String, &dyn Module)> {
        vec![(self.name.to_string(), &self.inner)]
    }
}

impl Module for Block {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let h = self.attn.forward(x)?;
        self.lm_head.forward(&self.mlp.forward(&h)?)
    }
    fn children(&self) -> Vec<(String, &dyn Module)> {
        vec![
            ("attn".into(), &self.attn),
            ("mlp".into(), &self.mlp),
            ("lm_head".into(), &self.lm_head),
        ]
    }
}

fn max_diff(a: &Tensor, b: &Tensor) -> f64 {
    a.to_f64_vec()
        .iter()
        .zip(b.to_f64_vec())
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f64::max)
}

fn randomise_b(model: &dyn Module) -> Result<()> {
    for (_, m) in model.named_modules() {
        if let Some(a) = m.as_linear().and_then(|l| l.lora()) {
            a.b.copy_(&Tensor::randn(a.b.dims()).mul_scalar(0.5)?)?;
        }
    }
    Ok(())
}

#[test]
fn targets_freeze_and_names() -> Result<()> {
    manual_seed(1);
    let model = Block::new()?;
    let x = Tensor::randn([3, 6]);
    let before = model.forward(&x)?;
    let config = LoraConfig::new(2, 4.0, &["q_proj", "v_proj"]);
    let names = lora::apply(&model, &config).unwrap();
    assert_eq!(names, ["attn.0.q_proj", "attn.1.v_proj"]);
    // B starts at zero: the output is unchanged.
    assert_eq!(max_diff(&before, &model.forward(&x)?), 0.0);
    let trainable: Vec<String> = model
        .named_parameters()
        .into_iter()
        .filter(|(_, t)| t.requires_grad())
        .map(|(n, _)| n)
        .collect();
    assert_eq!(
        trainable,
        [
            "attn.0.q_proj.lora_A.weight",
            "attn.0.q_proj.lora_B.weight",
            "attn.1.v_proj.lora_A.weight",
            "attn.1.v_proj.lora_B.weight"
        ]
    );
    assert_eq!(model.num_trainable_parameters(), 2 * (2 * 6 + 6 * 2));
    // PEFT's initialisation: A ~ U(±1/sqrt(in)), B = 0.
    let a = model.attn.named_parameters();
    let a_vals = a
        .iter()
        .find(|(n, _)| n.ends_with("lora_A.weight"))
        .unwrap()
        .1
        .to_f64_vec();
    assert!(a_vals.iter().all(|v| v.abs() <= 1.0 / 6f64.sqrt()));
    assert!(a_vals.iter().any(|v| *v != 0.0));
    assert!(lora::adapter_state_dict(&model)
        .iter()
        .all(|(n, _)| n.starts_with("base_model.model.attn.")));
    assert!(model.summary().contains("lora(r=2, scaling=2, dropout=0)"));
    Ok(())
}

#[test]
fn target_matching_follows_peft() -> Result<()> {
    let model = Block::new()?;
    // A suffix must be a whole name component: "proj" matches nothing.
    let err = lora::apply(&model, &LoraConfig::new(2, 2.0, &["proj"])).unwrap_err();
    assert!(
        matches!(err, LoraError::Target(ref m) if m.contains("not found")),
        "{err}"
    );
    // A regex must match the whole name.
    let mut c = LoraConfig::new(2, 2.0, &[]);
    c.target_modules = TargetModules::Pattern(r"attn\.\d+\.v_proj".into());
    assert_eq!(lora::apply(&model, &c).unwrap(), ["attn.1.v_proj"]);
    assert_eq!(lora::unload(&model), 1);
    // all-linear: every Linear but lm_head.
    c.target_modules = TargetModules::Pattern("all-linear".into());
    assert_eq!(
        lora::apply(&model, &c).unwrap(),
        ["attn.0.q_proj", "attn.1.v_proj", "mlp.0"]
    );
    assert_eq!(lora::unload(&model), 3);
    // Unsupported settings are refused, naming them.
    let mut c = LoraConfig::new(2, 2.0, &["q_proj"]);
    c.bias = "all".into();
    c.use_dora = true;
    let msg = lora::apply(&model, &c).unwrap_err().to_string();
    assert!(
        msg.contains("bias \"all\"") && msg.contains("DoRA"),
        "{msg}"
    );
    Ok(())
}

#[test]
fn lora_linear_gradcheck() -> Result<()> {
    manual_seed(2);
    let f64r = |d: &[usize]| Tensor::randn(d).to_dtype(DType::F64);
    let (x, w, bias, a, b) = (
        f64r(&[2, 3, 5])?,
        f64r(&[4, 5])?,
        f64r(&[4])?,
        f64r(&[3, 5])?,
        f64r(&[4, 3])?,
    );
    gradcheck(
        |t| {
            let lin = Linear::from_parts(t[1].clone(), Some(t[2].clone()));
            lin.set_lora(LoraAdapter {
                a: t[3].clone(),
                b: t[4].clone(),
                scaling: 1.5,
                dropout: Dropout::new(0.0),
            })?;
            lin.forward(&t[0])
        },
        &[x, w, bias, a, b],
    )
}

#[test]
fn only_adapters_train_and_merge_keeps_outputs() -> Result<()> {
    manual_seed(3);
    let model = Block::new()?;
    let base: Vec<(String, Vec<f64>)> = model
        .named_parameters()
        .into_iter()
        .map(|(n, t)| (n, t.to_f64_vec()))
        .collect();
    let mut config = LoraConfig::new(3, 6.0, &["q_proj", "v_proj", "mlp.0"]);
    config.lora_dropout = 0.1;
    lora::apply(&model, &config).unwrap();
    let mut opt = Adam::adamw(model.trainable_parameters(), 1e-2, 0.0);
    let x = Tensor::randn([4, 6]);
    let target = Tensor::from_vec(vec![0i64, 1, 2, 3], [4])?;
    model.train();
    let mut losses = Vec::new();
    for _ in 0..30 {
        let l = nerve_nn::loss::cross_entropy(&model.forward(&x)?, &target, &Default::default())?;
        losses.push(l.item::<f32>()?);
        opt.zero_grad();
        l.backward()?;
        opt.step()?;
    }
    assert!(losses[29] < losses[0] - 0.1, "loss {losses:?}");
    for (n, v) in &base {
        let now = model
            .named_parameters()
            .into_iter()
            .find(|(m, _)| m == n)
            .unwrap()
            .1;
        assert_eq!(&now.to_f64_vec(), v, "{n} changed");
    }
    model.eval();
    let adapted = model.forward(&x)?;
    assert_eq!(lora::merge(&model)?, 3);
    assert!(lora::adapter_state_dict(&model).is_empty());
    let merged = model.forward(&x)?;
    let d = max_diff(&adapted, &merged);
    assert!(d < 1e-5, "merged differs by {d}");
    Ok(())
}

#[test]
fn save_and_load_adapter() -> Result<()> {
    manual_seed(4);
    let dir = std::env::temp_dir().join(format!("nerve-lora-{}", std::process::id()));
    let model = Block::new()?;
    let mut config = LoraConfig::new(2, 16.0, &["q_proj", "v_proj"]);
    config.use_rslora = true;
    lora::apply(&model, &config).unwrap();
    randomise_b(&model)?;
    model.eval();
    let x = Tensor::randn([3, 6]);
    let want = model.forward(&x)?;
    lora::save(&model, &config, &dir).unwrap();

    // The file holds the adapters alone, under PEFT's names.
    let (tensors, _) = nerve_nn::checkpoint::load_safetensors(dir.join(ADAPTER_WEIGHTS)).unwrap();
    let mut names: Vec<&String> = tensors.keys().collect();
    names.sort();
    assert_eq!(
        names,
        [
            "base_model.model.attn.0.q_proj.lora_A.weight",
            "base_model.model.attn.0.q_proj.lora_B.weight",
            "base_model.model.attn.1.v_proj.lora_A.weight",
            "base_model.model.attn.1.v_proj.lora_B.weight"
        ]
    );
    let json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join(ADAPTER_CONFIG)).unwrap()).unwrap();
    assert_eq!(json["peft_type"], "LORA");
    assert_eq!(json["r"], 2);
    assert_eq!(json["use_rslora"], true);
    assert_eq!(
        json["target_modules"],
        serde_json::json!(["q_proj", "v_proj"])
    );

    // A fresh model with the same base weights and the loaded adapter computes the same.
    let fresh = Block::new()?;
    let base: std::collections::HashMap<String, Tensor> = model.state_dict().into_iter().collect();
    fresh.load_state_dict(&base, false).unwrap();
    let loaded = lora::load(&fresh, &dir).unwrap();
    assert_eq!(loaded, config);
    fresh.eval();
    assert_eq!(max_diff(&want, &fresh.forward(&x)?), 0.0);

    // An adapter of another rank does not fit: refused naming the file and the tensor, and
    // the model is left without adapters.
    let other = Block::new()?;
    let mut json2 = json.clone();
    json2["r"] = 3.into();
    std::fs::write(dir.join(ADAPTER_CONFIG), json2.to_string()).unwrap();
    let err = lora::load(&other, &dir).unwrap_err().to_string();
    assert!(
        err.contains(ADAPTER_WEIGHTS)
            && err.contains("q_proj.lora_A.weight: the model has [3, 6], the file [2, 6]"),
        "{err}"
    );
    assert!(lora::adapter_state_dict(&other).is_empty());

    // A config nerve cannot honour is refused naming the file and the field.
    json2["r"] = 2.into();
    json2["fan_in_fan_out"] = true.into();
    std::fs::write(dir.join(ADAPTER_CONFIG), json2.to_string()).unwrap();
    let err = lora::load(&other, &dir).unwrap_err().to_string();
    assert!(
        err.contains(ADAPTER_CONFIG) && err.contains("fan_in_fan_out"),
        "{err}"
    );
    std::fs::write(dir.join(ADAPTER_CONFIG), "{\"r\": 2").unwrap();
    let err = lora::load(&other, &dir).unwrap_err().to_string();
    assert!(err.contains(ADAPTER_CONFIG), "{err}");
    std::fs::remove_dir_all(&dir).ok();
    let err = lora::load(&other, &dir).unwrap_err().to_string();
    assert!(err.contains(ADAPTER_CONFIG), "{err}");
    Ok(())
}

#[test]
fn freezing_by_glob() -> Result<()> {
    assert!(glob_match(
        "model.layers.*.mlp.*",
        "model.layers.3.mlp.up_proj.weight"
    ));
    assert!(!glob_match(
        "model.layers.*.mlp.*",
        "model.layers.3.self_attn.q_proj.weight"
    ));
    assert!(glob_match("*.bias", "attn.1.v_proj.bias"));
    assert!(glob_match("*", ""));
    assert!(!glob_match("a*b", "ab.c"));
    assert!(glob_match("a*b*c", "aXbYbZc"));
    let model = Block::new()?;
    assert_eq!(model.set_frozen_matching("*.bias", true), 2);
    assert_eq!(model.set_frozen_matching("attn.*", true), 3);
    let trainable: Vec<String> = model
        .named_parameters()
        .into_iter()
        .filter(|(_, t)| t.requires_grad())
        .map(|(n, _)| n)
        .collect();
    assert_eq!(trainable, ["mlp.0.weight", "lm_head.weight"]);
    Ok(())
}

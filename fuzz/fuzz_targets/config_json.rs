//! Model config JSON: every config nerve reads from a file — Hugging Face's BERT
//! `config.json`, PEFT's `adapter_config.json`, and the zoo configs that `--config FILE.json`
//! and a run checkpoint's `nerve.config` hold — deserialised, merged over the defaults as
//! `nerve train` does, and validated.
#![no_main]

use std::path::Path;

use libfuzzer_sys::fuzz_target;
use nerve_models::{
    BertConfig, CharRnnConfig, GptConfig, LlamaConfig, MambaConfig, UNetConfig, VitConfig,
};
use serde::{de::DeserializeOwned, Serialize};
use serde_json::Value;

/// nerve-cli's `config_from`: the defaults of `T`, overridden by the fields of `user` (a
/// JSON object whose keys `T` must know).
fn merged<T: Serialize + DeserializeOwned + Default>(user: &Value) -> Option<T> {
    let mut v = serde_json::to_value(T::default()).expect("defaults serialise");
    let obj = v.as_object_mut().expect("configs are structs");
    let u = user.as_object()?;
    if u.keys().any(|k| !obj.contains_key(k)) {
        return None;
    }
    for (k, val) in u {
        obj.insert(k.clone(), val.clone());
    }
    let c: T = serde_json::from_value(v).ok()?;
    // What gets stored in the checkpoint must read back as the same config.
    let json = serde_json::to_value(&c).expect("configs serialise");
    let _: T = serde_json::from_value(json).expect("a stored config reads back");
    Some(c)
}

fn parsed<T: DeserializeOwned>(data: &[u8]) -> Option<T> {
    serde_json::from_slice(data).ok()
}

fuzz_target!(|data: &[u8]| {
    let path = Path::new("config.json");
    if let Ok(c) = BertConfig::from_json(data, path) {
        let _ = c.head_dim();
    }
    let _ = nerve_nn::lora::parse_config(data, Path::new("adapter_config.json"));
    if let Some(c) = parsed::<LlamaConfig>(data) {
        if c.validate().is_ok() {
            let _ = c.head_dim();
        }
    }
    let Ok(user) = serde_json::from_slice::<Value>(data) else {
        return;
    };
    let _ = merged::<GptConfig>(&user);
    let _ = merged::<VitConfig>(&user);
    let _ = merged::<CharRnnConfig>(&user);
    if let Some(c) = merged::<MambaConfig>(&user) {
        if c.validate().is_ok() {
            let _ = (c.padded_vocab_size(), c.block_options());
        }
    }
    if let Some(c) = merged::<UNetConfig>(&user) {
        let _ = c.validate();
    }
    if let Ok(c) = serde_json::from_value::<UNetConfig>(user) {
        let _ = c.validate();
    }
});

//! GGUF files: parse, read every metadata value and tensor (raw and dequantised), then
//! what the model loaders take from the metadata: the Llama config and the BPE tokenizer.
#![no_main]

use libfuzzer_sys::fuzz_target;
use nerve_io::gguf::GgufFile;

fuzz_target!(|data: &[u8]| {
    let Ok(f) = GgufFile::from_bytes(data.to_vec(), "fuzz.gguf") else {
        return;
    };
    for (key, value) in f.metadata() {
        let _ = (value.type_name(), value.as_integer());
        let _ = (
            f.get_str(key),
            f.get_u64(key),
            f.get_f64(key),
            f.get_array(key),
        );
    }
    let names: Vec<String> = f.tensor_names().map(String::from).collect();
    for name in &names {
        let info = f.tensor_info(name).expect("listed tensor");
        let raw = f.tensor_bytes(name).expect("listed tensor");
        assert_eq!(raw.len(), info.n_bytes);
        if let Ok(t) = f.tensor(name) {
            assert_eq!(t.to_f64_vec().len(), info.numel());
        }
    }
    let _ = nerve_models::gguf::llama_config(&f);
    if let Ok(tok) = nerve_models::gguf::tokenizer(&f) {
        if let Ok(ids) = tok.encode("Hello, world! 123", true) {
            let _ = tok.decode(&ids, false);
        }
        let chat = [nerve_data::ChatMessage::new("user", "hi")];
        let _ = tok.apply_chat_template(&chat, true);
    }
});

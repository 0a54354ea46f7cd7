//! safetensors files: load every tensor, then read each one's values.
#![no_main]

use std::path::Path;

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok((tensors, _meta)) =
        nerve_io::safetensors::load_bytes(data, Path::new("fuzz.safetensors"))
    else {
        return;
    };
    for (_, t) in &tensors {
        assert_eq!(t.to_f64_vec().len(), t.dims().iter().product::<usize>());
    }
});

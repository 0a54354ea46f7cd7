//! The restricted unpickler alone: run one pickle, then walk what it built.
#![no_main]

use std::path::Path;

use libfuzzer_sys::fuzz_target;
use nerve_io::pickle::{unpickle, Limits, Value};

/// Count the nodes under `v`, checking that the tree is no deeper than the limit allows.
fn walk(v: &Value, depth: usize) -> usize {
    assert!(
        depth <= Limits::default().max_depth + 1,
        "tree deeper than the limit"
    );
    let _ = (v.kind(), v.as_str(), v.as_i64());
    match v {
        Value::Tuple(items) | Value::List(items) | Value::Set(items) => {
            1 + items.iter().map(|c| walk(c, depth + 1)).sum::<usize>()
        }
        Value::Dict(d) => {
            let mut n = 1;
            for (k, c) in &d.items {
                n += walk(k, depth + 1) + walk(c, depth + 1);
            }
            n + d.state.as_deref().map_or(0, |s| walk(s, depth + 1))
        }
        _ => 1,
    }
}

fuzz_target!(|data: &[u8]| {
    let Ok(out) = unpickle(data, &Limits::default(), Path::new("fuzz.pkl")) else {
        return;
    };
    assert!(out.consumed as usize <= data.len());
    walk(&out.value, 0);
    for t in &out.tensors {
        assert_eq!(t.size.len(), t.stride.len());
        let _ = (t.storage.base(), t.storage.len());
    }
});

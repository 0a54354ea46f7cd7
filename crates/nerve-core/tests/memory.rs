//! The graph is freed after each step: 10,000 training steps of a small model hold no more
//! tensors or storage at the end than after the first hundred. Alone in its binary so that
//! no other test's tensors disturb the process-wide counts.

use nerve_core::{live_storage_bytes, live_tensors, manual_seed, DType, Tensor};

#[test]
fn training_10k_steps_does_not_grow_memory() {
    manual_seed(0);
    let w1 = Tensor::randn([8, 16])
        .mul_scalar(0.3)
        .unwrap()
        .requires_grad_(true);
    let b1 = Tensor::zeros([16]).requires_grad_(true);
    let w2 = Tensor::randn([16, 3])
        .mul_scalar(0.3)
        .unwrap()
        .requires_grad_(true);
    let x = Tensor::randn([32, 8]);
    let labels = Tensor::randint([32], 0, 3).unwrap();
    let target = labels.one_hot(3).unwrap().to_dtype(DType::F32).unwrap();
    let params = [&w1, &b1, &w2];
    let step = || {
        let h = x.matmul(&w1).unwrap().add(&b1).unwrap().relu().unwrap();
        let logp = h.matmul(&w2).unwrap().log_softmax(-1).unwrap();
        let loss = logp
            .mul(&target)
            .unwrap()
            .sum()
            .unwrap()
            .mul_scalar(-1.0 / 32.0)
            .unwrap();
        loss.backward().unwrap();
        for p in params {
            let g = p.grad().unwrap().to_vec::<f32>().unwrap();
            p.with_data_mut::<f32, _>(|d| {
                for (d, g) in d.iter_mut().zip(g) {
                    *d -= 0.05 * g;
                }
            })
            .unwrap();
            p.zero_grad();
        }
        loss.item::<f32>().unwrap()
    };
    let first = step();
    for _ in 0..100 {
        step();
    }
    let (tensors, bytes) = (live_tensors(), live_storage_bytes());
    let mut last = 0.0;
    for _ in 0..10_000 {
        last = step();
    }
    assert!(last < first, "loss went from {first} to {last}");
    // This is the only test in its binary, so the counts are exact: a leak of even one
    // tensor per step would add 10,000.
    assert!(
        live_tensors() <= tensors + 10,
        "{tensors} -> {} tensors",
        live_tensors()
    );
    assert!(
        live_storage_bytes() <= bytes + 1024,
        "{bytes} -> {} bytes",
        live_storage_bytes()
    );
}

//! The timing loop of the `*_parts` examples.

use nerve_core::{Result, Tensor};
use nerve_nn::{Module, Optimizer, TransformerBlock};

/// The allocator and setting of the `nerve-bench` binary (see its `keep_freed_memory`), so the
/// parts are timed as the workloads run: glibc's allocator would add page faults to every step.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Times the parts of a workload. With a filter (the example's first argument) only the parts
/// whose name contains it run, 200 times each (for a profiler); otherwise every part runs 21
/// times.
pub struct Timer {
    only: Option<String>,
}

impl Timer {
    /// A timer filtered by the first command-line argument, if any.
    pub fn from_args() -> Timer {
        if std::env::var_os("MIMALLOC_PURGE_DELAY").is_none() {
            // SAFETY: mi_option_set only stores an option value; 15 is mi_option_purge_delay
            // and -1 its documented "no purging" value.
            unsafe { libmimalloc_sys::mi_option_set(15, -1) }
        }
        Timer {
            only: std::env::args().nth(1),
        }
    }

    /// Run `f` once to warm up, then time it and print the median and the minimum (on a
    /// shared machine the figure least disturbed by others).
    pub fn time(&self, name: &str, f: &mut dyn FnMut() -> Result<()>) -> Result<()> {
        if self
            .only
            .as_ref()
            .is_some_and(|o| !name.contains(o.as_str()))
        {
            return Ok(());
        }
        f()?;
        let runs = if self.only.is_some() { 200 } else { 21 };
        let mut ms: Vec<f64> = (0..runs)
            .map(|_| {
                let t = std::time::Instant::now();
                f().map(|_| t.elapsed().as_secs_f64() * 1e3)
            })
            .collect::<Result<_>>()?;
        ms.sort_by(f64::total_cmp);
        println!(
            "{name:<48} {:8.3} ms median {:8.3} ms min",
            ms[ms.len() / 2],
            ms[0]
        );
        Ok(())
    }

    /// Time a training step in parts from its loss: forward, forward + backward, the
    /// optimizer's update alone (on gradients kept from one backward pass), and the whole
    /// step (forward, backward, update, zeroing of gradients).
    #[allow(dead_code)] // not every example times a whole step
    pub fn step_parts(
        &self,
        step_loss: &dyn Fn() -> Result<Tensor>,
        opt: &mut dyn Optimizer,
    ) -> Result<()> {
        self.time("step forward", &mut || step_loss().map(drop))?;
        self.time("step forward + backward", &mut || step_loss()?.backward())?;
        opt.zero_grad();
        step_loss()?.backward()?;
        self.time("optimizer step (gradients kept)", &mut || opt.step())?;
        opt.zero_grad();
        self.time("whole step", &mut || {
            step_loss()?.backward()?;
            opt.step()?;
            opt.zero_grad();
            Ok(())
        })
    }

    /// Time one Transformer block on `h` (`[batch, seq, width]`, requiring grad) and its
    /// parts: the block, a layer norm, the attention and its fused core on a packed
    /// projection of `heads` heads (causal or not), and the MLP; forward and forward +
    /// backward.
    #[allow(dead_code)] // not every example has a Transformer block
    pub fn block_parts(
        &self,
        blk: &TransformerBlock,
        h: &Tensor,
        heads: usize,
        causal: bool,
    ) -> Result<()> {
        let time = |name: &str, f: &mut dyn FnMut() -> Result<()>| self.time(name, f);
        let fwd_bwd = |m: &dyn Module| m.forward(h)?.sum()?.backward();
        time("block forward (no grad)", &mut || {
            nerve_core::no_grad(|| blk.forward(h)).map(drop)
        })?;
        time("block fwd + bwd", &mut || fwd_bwd(blk))?;
        time("layer norm fwd + bwd", &mut || fwd_bwd(&blk.ln_1))?;
        time("attention fwd + bwd", &mut || fwd_bwd(&blk.attn))?;
        let d = h.dims();
        let qkv = Tensor::randn([d[0], d[1], 3 * d[2]]).requires_grad_(true);
        let core = || nerve_nn::packed_self_attention(&qkv, heads, causal);
        time("attention core (packed) fwd", &mut || core().map(drop))?;
        time("attention core (packed) fwd + bwd", &mut || {
            core()?.sum()?.backward()
        })?;
        time("mlp fwd + bwd", &mut || fwd_bwd(&blk.mlp))
    }
}

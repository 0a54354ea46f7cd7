//! Reverse-mode automatic differentiation.
//!
//! Every op that sees an input requiring gradients records a [`Node`]: its inputs and a
//! closure that maps the output gradient to input gradients, written with ordinary tensor
//! ops. `backward` walks the graph in reverse topological order under no-grad, sums the
//! gradients of tensors used several times, and accumulates into the leaves' `.grad`. The
//! closures (and the activations they hold) are released as backward goes unless the graph is
//! retained; the rest of the graph is freed when the output is dropped.

use std::cell::Cell;
use std::collections::{HashMap, HashSet};
use std::sync::Mutex;

use crate::tensor::{Tensor, TensorId};
use crate::{Error, Result};

pub(crate) type BackwardFn = Box<dyn Fn(&Tensor) -> Result<Vec<Option<Tensor>>> + Send + Sync>;

/// A recorded op: `grad_fn` in PyTorch's words.
pub(crate) struct Node {
    pub(crate) op: &'static str,
    pub(crate) inputs: Vec<Tensor>,
    pub(crate) backward: Mutex<Option<BackwardFn>>,
}

thread_local! {
    static GRAD_ENABLED: Cell<bool> = const { Cell::new(true) };
}

/// Whether ops on this thread record the graph.
pub fn is_grad_enabled() -> bool {
    GRAD_ENABLED.with(|g| g.get())
}

/// Turn graph recording on or off for this thread; returns the previous setting.
pub fn set_grad_enabled(on: bool) -> bool {
    GRAD_ENABLED.with(|g| g.replace(on))
}

/// Run `f` without recording the graph (like `with torch.no_grad():`).
pub fn no_grad<R>(f: impl FnOnce() -> R) -> R {
    let _guard = NoGradGuard::new();
    f()
}

/// Disables graph recording on this thread until dropped.
pub struct NoGradGuard {
    prev: bool,
}

impl NoGradGuard {
    /// Start a no-grad scope.
    pub fn new() -> Self {
        NoGradGuard {
            prev: set_grad_enabled(false),
        }
    }
}

/// Gradient checkpointing (PyTorch's `torch.utils.checkpoint`): `f(x)` computed without
/// recording its graph, so none of its intermediate activations are kept; backward runs `f`
/// again with recording on and backpropagates through that second graph. Memory for one
/// block's activations is traded for a second forward pass.
///
/// `params` are the tensors inside `f` that collect gradients (a layer's trainable
/// parameters): they make the result differentiable even when `x` is not (a frozen
/// embedding's output feeding LoRA adapters), and their `.grad` is accumulated by the inner
/// backward. `f` must compute the same thing twice: the global random generator is put back to
/// its state of the first pass for the second (dropout masks agree) and restored afterwards.
pub fn checkpoint(
    f: impl Fn(&Tensor) -> Result<Tensor> + Send + Sync + 'static,
    x: &Tensor,
    params: &[Tensor],
) -> Result<Tensor> {
    let wants = x.requires_grad() || params.iter().any(Tensor::requires_grad);
    if !is_grad_enabled() || !wants {
        return f(x);
    }
    let rng = crate::random::with_global(|g| g.clone());
    let out = no_grad(|| f(x))?;
    let saved = x.detach();
    let x_grad = x.requires_grad();
    let mut inputs: Vec<&Tensor> = vec![x];
    inputs.extend(params.iter());
    let n = inputs.len();
    Ok(out.attach_backward("checkpoint", &inputs, move |g| {
        let now = crate::random::with_global(|cur| std::mem::replace(cur, rng.clone()));
        let prev = set_grad_enabled(true);
        let leaf = saved.detach().requires_grad_(x_grad);
        let result = f(&leaf).and_then(|y| {
            if y.requires_grad() {
                y.backward_with(g)?;
            }
            Ok(leaf.grad())
        });
        set_grad_enabled(prev);
        crate::random::with_global(|cur| *cur = now);
        let mut grads = vec![None; n];
        grads[0] = result?;
        Ok(grads)
    }))
}

impl Default for NoGradGuard {
    fn default() -> Self {
        Self::new()
    }
}

impl Drop for NoGradGuard {
    fn drop(&mut self) {
        set_grad_enabled(self.prev);
    }
}

impl Tensor {
    /// Whether gradients flow to this tensor: a leaf marked with `requires_grad_`, or the
    /// output of an op on such tensors.
    pub fn requires_grad(&self) -> bool {
        self.0.node.is_some()
            || self
                .0
                .requires_grad
                .load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Mark this leaf as collecting gradients (builder style, like `requires_grad_()`).
    pub fn requires_grad_(self, on: bool) -> Tensor {
        self.set_requires_grad(on);
        self
    }

    /// Mark this leaf as collecting gradients or not.
    pub fn set_requires_grad(&self, on: bool) {
        self.0
            .requires_grad
            .store(on, std::sync::atomic::Ordering::Relaxed);
    }

    /// Whether this tensor was made by the user rather than by a recorded op.
    pub fn is_leaf(&self) -> bool {
        self.0.node.is_none()
    }

    /// The name of the op that made this tensor, if recorded (PyTorch's `grad_fn`).
    pub fn grad_fn(&self) -> Option<&'static str> {
        self.0.node.as_ref().map(|n| n.op)
    }

    /// The gradient accumulated in this leaf, if any.
    pub fn grad(&self) -> Option<Tensor> {
        self.0
            .grad
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Replace the accumulated gradient.
    pub fn set_grad(&self, grad: Option<Tensor>) {
        *self.0.grad.lock().unwrap_or_else(|e| e.into_inner()) = grad;
    }

    /// Clear the accumulated gradient (PyTorch's `zero_grad(set_to_none=True)`).
    pub fn zero_grad(&self) {
        self.set_grad(None);
    }

    /// A tensor sharing this one's data, cut from the graph.
    pub fn detach(&self) -> Tensor {
        self.alias(self.0.layout.clone())
    }

    /// Backpropagate from this scalar: gradients accumulate into the leaves.
    pub fn backward(&self) -> Result<()> {
        if self.numel() != 1 {
            return Err(Error::Autograd(format!(
                "grad can be implicitly created only for scalar outputs, got shape {:?}; \
                 use backward_with",
                self.dims()
            )));
        }
        self.backward_with_opts(&self.ones_like(), false)
    }

    /// Backpropagate with an explicit upstream gradient of this tensor's shape.
    pub fn backward_with(&self, grad: &Tensor) -> Result<()> {
        self.backward_with_opts(grad, false)
    }

    /// Backpropagate; with `retain_graph` the graph may be walked again.
    pub fn backward_with_opts(&self, grad: &Tensor, retain_graph: bool) -> Result<()> {
        if !self.requires_grad() {
            return Err(Error::Autograd(
                "element 0 of tensors does not require grad and does not have a grad_fn".into(),
            ));
        }
        if grad.dims() != self.dims() {
            return Err(Error::shape_mismatch("backward", self.dims(), grad.dims()));
        }
        let _guard = NoGradGuard::new();
        let order = topo_order(self);
        let mut grads: HashMap<TensorId, Tensor> = HashMap::new();
        grads.insert(self.id(), grad.to_dtype(self.dtype())?);
        for t in order.iter().rev() {
            let Some(g) = grads.remove(&t.id()) else {
                continue;
            };
            match &t.0.node {
                None => {
                    let mut slot = t.0.grad.lock().unwrap_or_else(|e| e.into_inner());
                    *slot = Some(match slot.take() {
                        Some(old) => old.add(&g)?,
                        // A gradient that aliases other tensors (an upstream gradient passed
                        // through, an expanded view) is copied, so that in-place updates of
                        // one leaf's .grad never touch another's.
                        None if g.owns_storage_alone() => g,
                        None => g.copy()?,
                    });
                }
                Some(node) => {
                    let input_grads = {
                        let mut bw = node.backward.lock().unwrap_or_else(|e| e.into_inner());
                        let Some(f) = bw.as_ref() else {
                            return Err(Error::Autograd(format!(
                                "trying to backward through the graph a second time ({} was \
                                 freed); use retain_graph",
                                node.op
                            )));
                        };
                        let r = f(&g)?;
                        if !retain_graph {
                            *bw = None;
                        }
                        r
                    };
                    for (input, ig) in node.inputs.iter().zip(input_grads) {
                        let Some(ig) = ig else { continue };
                        if !input.requires_grad() {
                            continue;
                        }
                        if ig.dims() != input.dims() {
                            return Err(Error::Autograd(format!(
                                "{} produced a gradient of shape {:?} for an input of shape {:?}",
                                node.op,
                                ig.dims(),
                                input.dims()
                            )));
                        }
                        let sum = match grads.remove(&input.id()) {
                            Some(prev) => prev.add(&ig)?,
                            None => ig,
                        };
                        grads.insert(input.id(), sum);
                    }
                }
            }
        }
        Ok(())
    }
}

/// Tensors reachable from `root` that require grad, in topological order (inputs first).
fn topo_order(root: &Tensor) -> Vec<Tensor> {
    let mut order = Vec::new();
    let mut seen: HashSet<TensorId> = HashSet::new();
    // Iterative post-order DFS: (tensor, children pushed?)
    let mut stack: Vec<(Tensor, bool)> = vec![(root.clone(), false)];
    while let Some((t, expanded)) = stack.pop() {
        if expanded {
            order.push(t);
            continue;
        }
        if !seen.insert(t.id()) {
            continue;
        }
        let node = t.0.node.clone();
        stack.push((t, true));
        if let Some(node) = node {
            for input in &node.inputs {
                if input.requires_grad() && !seen.contains(&input.id()) {
                    stack.push((input.clone(), false));
                }
            }
        }
    }
    order
}

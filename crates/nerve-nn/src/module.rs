//! The [`Module`] trait, PyTorch-style names for parameters and buffers, and [`Sequential`].

use std::collections::{BTreeMap, HashMap};

use nerve_core::{Result, Tensor};

/// A network layer or a whole network.
///
/// A module owns parameters (tensors that require grad), buffers (state that is saved but not
/// trained, like BatchNorm's running statistics) and child modules. Names follow PyTorch's
/// `state_dict`: `features.0.weight`, so checkpoints map 1:1 to a PyTorch model with the same
/// structure.
pub trait Module: Send + Sync {
    /// Apply the module to `x`.
    fn forward(&self, x: &Tensor) -> Result<Tensor>;

    /// This module's own parameters by local name (`weight`, `bias`); not its children's.
    fn own_parameters(&self) -> Vec<(String, Tensor)> {
        Vec::new()
    }

    /// This module's own buffers by local name.
    fn own_buffers(&self) -> Vec<(String, Tensor)> {
        Vec::new()
    }

    /// The child modules by local name, in registration order.
    fn children(&self) -> Vec<(String, &dyn Module)> {
        Vec::new()
    }

    /// Switch this module's own training-mode behaviour (Dropout, BatchNorm); see
    /// [`ModuleExt::train`] for the recursive switch.
    fn set_training(&self, _training: bool) {}

    /// A one-line description, like PyTorch's `repr` (`Linear(in_features=784, ...)`).
    fn describe(&self) -> String {
        String::new()
    }

    /// This module as a [`Linear`](crate::Linear), if it is one (how LoRA finds its targets).
    fn as_linear(&self) -> Option<&crate::Linear> {
        None
    }
}

/// Recursive helpers every module gets.
pub trait ModuleExt: Module {
    /// Every parameter with its full dotted name, in PyTorch's order; a parameter shared by
    /// several modules (tied weights) is listed once, under its first name.
    fn named_parameters(&self) -> Vec<(String, Tensor)> {
        let mut out = Vec::new();
        let mut seen = std::collections::HashSet::new();
        walk(self.as_dyn(), "", &mut |prefix, m| {
            for (n, t) in m.own_parameters() {
                if seen.insert(t.id()) {
                    out.push((format!("{prefix}{n}"), t));
                }
            }
        });
        out
    }

    /// Every parameter.
    fn parameters(&self) -> Vec<Tensor> {
        self.named_parameters()
            .into_iter()
            .map(|(_, t)| t)
            .collect()
    }

    /// Every buffer with its full dotted name.
    fn named_buffers(&self) -> Vec<(String, Tensor)> {
        let mut out = Vec::new();
        walk(self.as_dyn(), "", &mut |prefix, m| {
            for (n, t) in m.own_buffers() {
                out.push((format!("{prefix}{n}"), t));
            }
        });
        out
    }

    /// Parameters and buffers by name, in PyTorch's `state_dict` order (each module's
    /// parameters, then its buffers, then its children). The tensors share storage with the
    /// module.
    fn state_dict(&self) -> Vec<(String, Tensor)> {
        let mut out = Vec::new();
        walk(self.as_dyn(), "", &mut |prefix, m| {
            for (n, t) in m.own_parameters().into_iter().chain(m.own_buffers()) {
                out.push((format!("{prefix}{n}"), t));
            }
        });
        out
    }

    /// Copy values from `state` into this module's parameters and buffers.
    ///
    /// Everything is checked before anything is written: with `strict`, a missing or
    /// unexpected name is an error; a shape mismatch always is. So a bad checkpoint leaves
    /// the module untouched.
    fn load_state_dict(
        &self,
        state: &HashMap<String, Tensor>,
        strict: bool,
    ) -> std::result::Result<(), StateDictError> {
        let own = self.state_dict();
        let mut missing = Vec::new();
        let mut mismatched = Vec::new();
        for (name, t) in &own {
            match state.get(name) {
                None => missing.push(name.clone()),
                Some(s) if s.dims() != t.dims() => {
                    mismatched.push((name.clone(), t.dims().to_vec(), s.dims().to_vec()))
                }
                Some(_) => {}
            }
        }
        let known: BTreeMap<&str, ()> = own.iter().map(|(n, _)| (n.as_str(), ())).collect();
        let mut unexpected: Vec<String> = state
            .keys()
            .filter(|k| !known.contains_key(k.as_str()))
            .cloned()
            .collect();
        unexpected.sort();
        if !mismatched.is_empty() || (strict && (!missing.is_empty() || !unexpected.is_empty())) {
            return Err(StateDictError {
                missing,
                unexpected,
                mismatched,
            });
        }
        for (name, t) in &own {
            if let Some(s) = state.get(name) {
                t.copy_(s).map_err(|e| StateDictError {
                    missing: Vec::new(),
                    unexpected: Vec::new(),
                    mismatched: vec![(
                        format!("{name}: {e}"),
                        t.dims().to_vec(),
                        s.dims().to_vec(),
                    )],
                })?;
            }
        }
        Ok(())
    }

    /// Training mode for this module and every descendant (PyTorch's `train()`).
    fn train(&self) {
        walk(self.as_dyn(), "", &mut |_, m| m.set_training(true));
    }

    /// Evaluation mode for this module and every descendant (PyTorch's `eval()`).
    fn eval(&self) {
        walk(self.as_dyn(), "", &mut |_, m| m.set_training(false));
    }

    /// Number of scalar parameters.
    fn num_parameters(&self) -> usize {
        self.parameters().iter().map(Tensor::numel).sum()
    }

    /// Turn gradients off (`freeze = true`) or on for the parameters under `prefix`, a dotted
    /// name or module path (`"features.1"` covers `features.1.weight`, not
    /// `features.10.weight`; `""` covers all); returns how many parameters were changed.
    fn set_frozen(&self, prefix: &str, freeze: bool) -> usize {
        let mut n = 0;
        let prefix = prefix.trim_end_matches('.');
        for (name, t) in self.named_parameters() {
            let under = prefix.is_empty()
                || name == prefix
                || name
                    .strip_prefix(prefix)
                    .is_some_and(|rest| rest.starts_with('.'));
            if under {
                t.set_requires_grad(!freeze);
                n += 1;
            }
        }
        n
    }

    /// Turn gradients off (`freeze = true`) or on for every parameter whose full name matches
    /// the glob `pattern` (`*` stands for any run of characters, dots included:
    /// `"model.layers.*.mlp.*"`, `"*.bias"`); returns how many parameters were changed.
    fn set_frozen_matching(&self, pattern: &str, freeze: bool) -> usize {
        let mut n = 0;
        for (name, t) in self.named_parameters() {
            if glob_match(pattern, &name) {
                t.set_requires_grad(!freeze);
                n += 1;
            }
        }
        n
    }

    /// The parameters that collect gradients (what an optimizer should get).
    fn trainable_parameters(&self) -> Vec<Tensor> {
        self.parameters()
            .into_iter()
            .filter(Tensor::requires_grad)
            .collect()
    }

    /// Number of scalar parameters that collect gradients.
    fn num_trainable_parameters(&self) -> usize {
        self.trainable_parameters().iter().map(Tensor::numel).sum()
    }

    /// This module and every descendant with its dotted name (`""` for this one), depth
    /// first in registration order, like PyTorch's `named_modules()`.
    fn named_modules(&self) -> Vec<(String, &dyn Module)> {
        fn rec<'a>(m: &'a dyn Module, name: String, out: &mut Vec<(String, &'a dyn Module)>) {
            let kids = m.children();
            out.push((name.clone(), m));
            for (n, c) in kids {
                let full = if name.is_empty() {
                    n
                } else {
                    format!("{name}.{n}")
                };
                rec(c, full, out);
            }
        }
        let mut out = Vec::new();
        rec(self.as_dyn(), String::new(), &mut out);
        out
    }

    /// Clear the gradients of every parameter.
    fn zero_grad(&self) {
        for p in self.parameters() {
            p.zero_grad();
        }
    }

    /// A multi-line summary of the module tree, like printing a PyTorch module.
    fn summary(&self) -> String {
        let mut out = String::new();
        fn rec(m: &dyn Module, name: &str, depth: usize, out: &mut String) {
            let pad = "  ".repeat(depth);
            let head = if name.is_empty() {
                String::new()
            } else {
                format!("({name}): ")
            };
            let kids = m.children();
            if kids.is_empty() {
                out.push_str(&format!("{pad}{head}{}\n", m.describe()));
            } else {
                out.push_str(&format!("{pad}{head}{}(\n", m.describe()));
                for (n, c) in kids {
                    rec(c, &n, depth + 1, out);
                }
                out.push_str(&format!("{pad})\n"));
            }
        }
        rec(self.as_dyn(), "", 0, &mut out);
        out
    }

    /// `self` as a trait object.
    fn as_dyn(&self) -> &dyn Module;
}

impl<M: Module> ModuleExt for M {
    fn as_dyn(&self) -> &dyn Module {
        self
    }
}

impl<'a> ModuleExt for dyn Module + 'a {
    fn as_dyn(&self) -> &dyn Module {
        self
    }
}

/// Whether `name` matches the glob `pattern`, where `*` matches any run of characters
/// (dots included) and every other character itself.
pub fn glob_match(pattern: &str, name: &str) -> bool {
    let (p, n) = (pattern.as_bytes(), name.as_bytes());
    // Classic greedy matching with backtracking to the last star.
    let (mut i, mut j) = (0, 0);
    let mut star: Option<(usize, usize)> = None;
    while j < n.len() {
        if i < p.len() && p[i] == b'*' {
            star = Some((i, j));
            i += 1;
        } else if i < p.len() && p[i] == n[j] {
            i += 1;
            j += 1;
        } else if let Some((si, sj)) = star {
            i = si + 1;
            j = sj + 1;
            star = Some((si, sj + 1));
        } else {
            return false;
        }
    }
    p[i..].iter().all(|&c| c == b'*')
}

/// Visit `m` and its descendants depth-first with their dotted prefixes (`"features.0."`).
fn walk(m: &dyn Module, prefix: &str, f: &mut dyn FnMut(&str, &dyn Module)) {
    f(prefix, m);
    for (name, c) in m.children() {
        walk(c, &format!("{prefix}{name}."), f);
    }
}

/// A state dict that does not fit a module: names missing from it, names the module lacks,
/// and shape mismatches (`name`, the module's shape, the state's shape).
#[derive(Debug, Clone, PartialEq)]
pub struct StateDictError {
    /// Names the module has and the state lacks.
    pub missing: Vec<String>,
    /// Names the state has and the module lacks.
    pub unexpected: Vec<String>,
    /// Names whose shapes differ: (name, module shape, state shape).
    pub mismatched: Vec<(String, Vec<usize>, Vec<usize>)>,
}

impl std::fmt::Display for StateDictError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mut parts = Vec::new();
        if !self.missing.is_empty() {
            parts.push(format!("missing keys: {}", self.missing.join(", ")));
        }
        if !self.unexpected.is_empty() {
            parts.push(format!("unexpected keys: {}", self.unexpected.join(", ")));
        }
        for (n, a, b) in &self.mismatched {
            parts.push(format!(
                "size mismatch for {n}: the model has {a:?}, the checkpoint {b:?}"
            ));
        }
        write!(
            f,
            "state dict does not match the model: {}",
            parts.join("; ")
        )
    }
}

impl std::error::Error for StateDictError {}

/// Modules applied one after another; children are named `0`, `1`, …
#[derive(Default)]
pub struct Sequential {
    layers: Vec<Box<dyn Module>>,
}

impl Sequential {
    /// An empty sequence.
    pub fn new() -> Self {
        Self::default()
    }

    /// Append a module (builder style).
    #[allow(clippy::should_implement_trait)]
    pub fn add(mut self, m: impl Module + 'static) -> Self {
        self.layers.push(Box::new(m));
        self
    }

    /// Append a boxed module.
    pub fn push(&mut self, m: Box<dyn Module>) {
        self.layers.push(m);
    }

    /// Number of modules.
    pub fn len(&self) -> usize {
        self.layers.len()
    }

    /// Whether there are no modules.
    pub fn is_empty(&self) -> bool {
        self.layers.is_empty()
    }
}

impl Module for Sequential {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let mut h = x.clone();
        for l in &self.layers {
            h = l.forward(&h)?;
        }
        Ok(h)
    }

    fn children(&self) -> Vec<(String, &dyn Module)> {
        self.layers
            .iter()
            .enumerate()
            .map(|(i, l)| (i.to_string(), l.as_ref()))
            .collect()
    }

    fn describe(&self) -> String {
        "Sequential".into()
    }
}

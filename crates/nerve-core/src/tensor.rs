//! The tensor: a strided view into shared storage, with an optional autodiff node.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use crate::autograd::{BackwardFn, Node};
use crate::dtype::{DType, Element};
use crate::layout::Layout;
use crate::shape::Shape;
use crate::storage::{CpuStorage, Storage};
use crate::{Error, Result};

/// Unique identity of a tensor (of one `Tensor` value and its clones, not of its storage).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct TensorId(u64);

impl TensorId {
    fn new() -> Self {
        static NEXT: AtomicU64 = AtomicU64::new(1);
        TensorId(NEXT.fetch_add(1, Ordering::Relaxed))
    }
}

static LIVE_TENSORS: AtomicU64 = AtomicU64::new(0);

/// Number of live tensor objects in the process (views and graph nodes included): a leak
/// detector for tests.
pub fn live_tensors() -> u64 {
    LIVE_TENSORS.load(Ordering::Relaxed)
}

pub(crate) struct TensorImpl {
    pub(crate) id: TensorId,
    pub(crate) storage: Arc<Storage>,
    pub(crate) layout: Layout,
    pub(crate) dtype: DType,
    /// The op that produced this tensor (`grad_fn`), `None` for leaves.
    pub(crate) node: Option<Arc<Node>>,
    /// Whether a leaf collects gradients.
    pub(crate) requires_grad: AtomicBool,
    /// The accumulated gradient of a leaf.
    pub(crate) grad: Mutex<Option<Tensor>>,
}

/// An n-dimensional array with runtime rank, shared storage (cloning is cheap and aliases the
/// data, like a Python reference) and reverse-mode autodiff.
///
/// Ops follow PyTorch's names and semantics and return `Result`, whose error names the op and
/// the shapes involved.
///
/// ```
/// use nerve_core::Tensor;
/// let a = Tensor::from_slice(&[1.0f32, 2.0, 3.0, 4.0], [2, 2]).unwrap().requires_grad_(true);
/// let loss = a.mul(&a).unwrap().sum().unwrap();
/// loss.backward().unwrap();
/// assert_eq!(a.grad().unwrap().to_vec::<f32>().unwrap(), vec![2.0, 4.0, 6.0, 8.0]);
/// ```
#[derive(Clone)]
pub struct Tensor(pub(crate) Arc<TensorImpl>);

impl Drop for TensorImpl {
    fn drop(&mut self) {
        LIVE_TENSORS.fetch_sub(1, Ordering::Relaxed);
        // Free long graphs iteratively: a recursive drop of a chain of 100k nodes would
        // overflow the stack.
        let Some(node) = self.node.take() else { return };
        let mut stack: Vec<Arc<Node>> = vec![node];
        while let Some(node) = stack.pop() {
            let Ok(mut node) = Arc::try_unwrap(node) else {
                continue;
            };
            for input in node.inputs.drain(..) {
                if let Ok(mut inner) = Arc::try_unwrap(input.0) {
                    if let Some(n) = inner.node.take() {
                        stack.push(n);
                    }
                }
            }
        }
    }
}

impl Tensor {
    // ---------------------------------------------------------------- construction (internal)

    pub(crate) fn from_parts(storage: Arc<Storage>, layout: Layout, dtype: DType) -> Tensor {
        LIVE_TENSORS.fetch_add(1, Ordering::Relaxed);
        Tensor(Arc::new(TensorImpl {
            id: TensorId::new(),
            storage,
            layout,
            dtype,
            node: None,
            requires_grad: AtomicBool::new(false),
            grad: Mutex::new(None),
        }))
    }

    /// A new contiguous tensor owning `data`.
    pub(crate) fn from_storage(data: CpuStorage, shape: &[usize]) -> Tensor {
        debug_assert_eq!(data.len(), shape.iter().product::<usize>());
        let dtype = data.dtype();
        Tensor::from_parts(
            Arc::new(Storage::new(data)),
            Layout::contiguous(shape),
            dtype,
        )
    }

    /// A new contiguous tensor from a typed buffer (length checked by the caller).
    pub(crate) fn from_buf<T: Element>(data: Vec<T>, shape: &[usize]) -> Tensor {
        Tensor::from_storage(T::into_storage(data), shape)
    }

    /// A view sharing this tensor's storage with another layout, no autodiff node.
    pub(crate) fn alias(&self, layout: Layout) -> Tensor {
        Tensor::from_parts(self.0.storage.clone(), layout, self.0.dtype)
    }

    /// Attach an autodiff node to a freshly made tensor when gradients are being recorded and
    /// an input requires them. `backward` maps the output gradient to one optional gradient
    /// per input.
    pub(crate) fn with_grad(
        mut self,
        op: &'static str,
        inputs: &[&Tensor],
        backward: impl Fn(&Tensor) -> Result<Vec<Option<Tensor>>> + Send + Sync + 'static,
    ) -> Tensor {
        if !crate::autograd::is_grad_enabled() || !inputs.iter().any(|t| t.requires_grad()) {
            return self;
        }
        let node = Node {
            op,
            inputs: inputs.iter().map(|t| (*t).clone()).collect(),
            backward: Mutex::new(Some(Box::new(backward) as BackwardFn)),
        };
        match Arc::get_mut(&mut self.0) {
            Some(inner) => inner.node = Some(Arc::new(node)),
            None => {
                // Shared already (should not happen for fresh outputs): wrap in a new alias.
                let mut t = self.alias(self.0.layout.clone());
                Arc::get_mut(&mut t.0).expect("fresh alias").node = Some(Arc::new(node));
                return t;
            }
        }
        self
    }

    /// Make `self`, a fresh result computed from `inputs` outside autodiff (a fused kernel in
    /// another crate), differentiable: `backward` maps the output gradient to one optional
    /// gradient per input. Nothing is recorded when gradients are off or no input requires
    /// them. For ops that nerve-core's own ops would make slow (e.g. a fused cross-entropy).
    pub fn attach_backward(
        self,
        op: &'static str,
        inputs: &[&Tensor],
        backward: impl Fn(&Tensor) -> Result<Vec<Option<Tensor>>> + Send + Sync + 'static,
    ) -> Tensor {
        self.with_grad(op, inputs, backward)
    }

    /// A view of this tensor's storage with a new layout, differentiable through `backward`.
    pub(crate) fn view_with_grad(
        &self,
        layout: Layout,
        op: &'static str,
        backward: impl Fn(&Tensor) -> Result<Vec<Option<Tensor>>> + Send + Sync + 'static,
    ) -> Tensor {
        self.alias(layout).with_grad(op, &[self], backward)
    }

    /// Run `f` on the typed storage slice and this tensor's layout.
    pub(crate) fn read<T: Element, R>(&self, f: impl FnOnce(&[T], &Layout) -> R) -> R {
        let guard = self.0.storage.read();
        let slice = T::slice(&guard).expect("dtype checked by the caller");
        f(slice, &self.0.layout)
    }

    /// Run `f` on the typed storage slices of two tensors (which may share storage).
    pub(crate) fn read2<T: Element, V: Element, R>(
        &self,
        other: &Tensor,
        f: impl FnOnce(&[T], &Layout, &[V], &Layout) -> R,
    ) -> R {
        if Arc::ptr_eq(&self.0.storage, &other.0.storage) {
            let guard = self.0.storage.read();
            let a = T::slice(&guard).expect("dtype checked by the caller");
            let b = V::slice(&guard).expect("dtype checked by the caller");
            return f(a, &self.0.layout, b, &other.0.layout);
        }
        let ga = self.0.storage.read();
        let gb = other.0.storage.read();
        let a = T::slice(&ga).expect("dtype checked by the caller");
        let b = V::slice(&gb).expect("dtype checked by the caller");
        f(a, &self.0.layout, b, &other.0.layout)
    }

    // ---------------------------------------------------------------- public construction

    /// A tensor from a vector and a shape (row-major). Errors if the lengths disagree.
    pub fn from_vec<T: Element>(data: Vec<T>, shape: impl Into<Shape>) -> Result<Tensor> {
        let shape = shape.into();
        if data.len() != shape.numel() {
            return Err(Error::bad_shape(
                "from_vec",
                shape.dims(),
                format!("{} elements given", data.len()),
            ));
        }
        Ok(Tensor::from_buf(data, shape.dims()))
    }

    /// A tensor copied from a slice and a shape (row-major).
    pub fn from_slice<T: Element>(data: &[T], shape: impl Into<Shape>) -> Result<Tensor> {
        Tensor::from_vec(data.to_vec(), shape)
    }

    /// A rank-0 tensor holding one value.
    pub fn scalar<T: Element>(v: T) -> Tensor {
        Tensor::from_buf(vec![v], &[])
    }

    /// A tensor filled with `value` converted to `dtype`.
    pub fn full_with(shape: impl Into<Shape>, value: f64, dtype: DType) -> Tensor {
        let shape = shape.into();
        let n = shape.numel();
        let data = CpuStorage::full(n, value, dtype);
        Tensor::from_storage(data, shape.dims())
    }

    /// An f32 tensor filled with `value`.
    pub fn full(shape: impl Into<Shape>, value: f64) -> Tensor {
        Tensor::full_with(shape, value, DType::F32)
    }

    /// An f32 tensor of zeros.
    pub fn zeros(shape: impl Into<Shape>) -> Tensor {
        Tensor::full_with(shape, 0.0, DType::F32)
    }

    /// An f32 tensor of ones.
    pub fn ones(shape: impl Into<Shape>) -> Tensor {
        Tensor::full_with(shape, 1.0, DType::F32)
    }

    /// Zeros of the given dtype.
    pub fn zeros_with(shape: impl Into<Shape>, dtype: DType) -> Tensor {
        Tensor::full_with(shape, 0.0, dtype)
    }

    /// Zeros with this tensor's shape and dtype.
    pub fn zeros_like(&self) -> Tensor {
        Tensor::full_with(self.dims(), 0.0, self.dtype())
    }

    /// Ones with this tensor's shape and dtype.
    pub fn ones_like(&self) -> Tensor {
        Tensor::full_with(self.dims(), 1.0, self.dtype())
    }

    /// `value` with this tensor's shape and dtype.
    pub fn full_like(&self, value: f64) -> Tensor {
        Tensor::full_with(self.dims(), value, self.dtype())
    }

    /// f32 values `start, start+step, ...` below `end` (like `torch.arange(0., 5.)`).
    pub fn arange(start: f64, end: f64, step: f64) -> Result<Tensor> {
        if step == 0.0 || (end - start) / step < 0.0 {
            return Err(Error::invalid(
                "arange",
                format!("bad range {start}..{end} step {step}"),
            ));
        }
        let n = ((end - start) / step).ceil() as usize;
        let v: Vec<f32> = (0..n).map(|i| (start + i as f64 * step) as f32).collect();
        Ok(Tensor::from_buf(v, &[n]))
    }

    /// i64 values `start, start+step, ...` below `end` (like `torch.arange(5)`).
    pub fn arange_i64(start: i64, end: i64, step: i64) -> Result<Tensor> {
        if step == 0 || (end - start).signum() * step.signum() < 0 {
            return Err(Error::invalid(
                "arange",
                format!("bad range {start}..{end} step {step}"),
            ));
        }
        let n = ((end - start) as f64 / step as f64).ceil().max(0.0) as usize;
        let v: Vec<i64> = (0..n as i64).map(|i| start + i * step).collect();
        Ok(Tensor::from_buf(v, &[n]))
    }

    /// `steps` f32 values evenly spaced from `start` to `end` inclusive.
    pub fn linspace(start: f64, end: f64, steps: usize) -> Tensor {
        let v: Vec<f32> = (0..steps)
            .map(|i| {
                if steps == 1 {
                    start as f32
                } else {
                    (start + (end - start) * i as f64 / (steps - 1) as f64) as f32
                }
            })
            .collect();
        Tensor::from_buf(v, &[steps])
    }

    /// The n×n f32 identity matrix.
    pub fn eye(n: usize) -> Tensor {
        let mut v = vec![0f32; n * n];
        for i in 0..n {
            v[i * n + i] = 1.0;
        }
        Tensor::from_buf(v, &[n, n])
    }

    // ---------------------------------------------------------------- accessors

    /// The sizes of each dimension (PyTorch's `shape`/`size()`).
    pub fn dims(&self) -> &[usize] {
        self.0.layout.dims()
    }
    /// The shape as an owned [`Shape`].
    pub fn shape(&self) -> Shape {
        Shape(self.dims().to_vec())
    }
    /// Size of dimension `dim` (negative counts from the end).
    pub fn size(&self, dim: isize) -> Result<usize> {
        let d = crate::shape::normalize_dim("size", dim, self.rank())?;
        Ok(self.dims()[d])
    }
    /// Number of dimensions.
    pub fn rank(&self) -> usize {
        self.0.layout.rank()
    }
    /// Number of elements.
    pub fn numel(&self) -> usize {
        self.0.layout.numel()
    }
    /// Element type.
    pub fn dtype(&self) -> DType {
        self.0.dtype
    }
    /// Strides in elements.
    pub fn strides(&self) -> &[usize] {
        self.0.layout.strides()
    }
    /// The layout (shape, strides, offset).
    pub fn layout(&self) -> &Layout {
        &self.0.layout
    }
    /// Whether the elements are in row-major order without gaps.
    pub fn is_contiguous(&self) -> bool {
        self.0.layout.is_contiguous()
    }
    /// This tensor's identity.
    pub fn id(&self) -> TensorId {
        self.0.id
    }
    /// Whether two tensors share the same storage.
    pub fn shares_storage(&self, other: &Tensor) -> bool {
        Arc::ptr_eq(&self.0.storage, &other.0.storage)
    }

    /// Copy the elements out in row-major order. Errors if `T` is not the tensor's dtype.
    pub fn to_vec<T: Element>(&self) -> Result<Vec<T>> {
        self.check_dtype::<T>("to_vec")?;
        Ok(self.read::<T, _>(|s, l| match l.contiguous_range() {
            Some(r) => s[r].to_vec(),
            None => l.offsets().map(|o| s[o]).collect(),
        }))
    }

    /// The elements converted to f64, in row-major order (any dtype).
    pub fn to_f64_vec(&self) -> Vec<f64> {
        let g = self.0.storage.read();
        self.0.layout.offsets().map(|o| g.get_f64(o)).collect()
    }

    /// The single value of a one-element tensor.
    pub fn item<T: Element>(&self) -> Result<T> {
        if self.numel() != 1 {
            return Err(Error::bad_shape(
                "item",
                self.dims(),
                "only one-element tensors can be converted to a scalar",
            ));
        }
        self.check_dtype::<T>("item")?;
        Ok(self.read::<T, _>(|s, l| s[l.offset()]))
    }

    pub(crate) fn check_dtype<T: Element>(&self, op: &'static str) -> Result<()> {
        if T::DTYPE != self.dtype() {
            return Err(Error::DTypeMismatch {
                op,
                lhs: self.dtype(),
                rhs: T::DTYPE,
            });
        }
        Ok(())
    }

    /// Run `f` on the mutable contiguous elements of this tensor, in place (for optimizers and
    /// initialisers; not recorded by autodiff). Errors if the tensor is not contiguous or `T`
    /// is not its dtype.
    pub fn with_data_mut<T: Element, R>(&self, f: impl FnOnce(&mut [T]) -> R) -> Result<R> {
        self.check_dtype::<T>("with_data_mut")?;
        let Some(range) = self.0.layout.contiguous_range() else {
            return Err(Error::bad_shape(
                "with_data_mut",
                self.dims(),
                "tensor is not contiguous",
            ));
        };
        let mut guard = self.0.storage.write();
        let slice = T::slice_mut(&mut guard).expect("dtype checked");
        Ok(f(&mut slice[range]))
    }

    /// Run `f` on the contiguous elements of this tensor (copying first if it is a strided view).
    pub fn with_data<T: Element, R>(&self, f: impl FnOnce(&[T]) -> R) -> Result<R> {
        self.check_dtype::<T>("with_data")?;
        let t = if self.is_contiguous() {
            self.clone()
        } else {
            crate::autograd::no_grad(|| self.contiguous())?
        };
        Ok(t.read::<T, _>(|s, l| f(&s[l.contiguous_range().expect("contiguous")])))
    }

    /// Copy `src`'s values into this tensor in place (shapes must match; dtypes converted).
    /// Not recorded by autodiff.
    pub fn copy_(&self, src: &Tensor) -> Result<()> {
        if src.dims() != self.dims() {
            return Err(Error::shape_mismatch("copy_", self.dims(), src.dims()));
        }
        let src = crate::autograd::no_grad(|| src.to_dtype(self.dtype())?.contiguous())?;
        let data = src.0.storage.read().clone();
        let layout = self.0.layout.clone();
        let srange = src.0.layout.contiguous_range().expect("contiguous");
        let mut guard = self.0.storage.write();
        macro_rules! copy {
            ($a:expr, $b:expr) => {{
                for (o, v) in layout.offsets().zip(&$b[srange.clone()]) {
                    $a[o] = *v;
                }
            }};
        }
        match (&mut *guard, &data) {
            (CpuStorage::F32(a), CpuStorage::F32(b)) => copy!(a, b),
            (CpuStorage::F64(a), CpuStorage::F64(b)) => copy!(a, b),
            (CpuStorage::F16(a), CpuStorage::F16(b)) => copy!(a, b),
            (CpuStorage::BF16(a), CpuStorage::BF16(b)) => copy!(a, b),
            (CpuStorage::I64(a), CpuStorage::I64(b)) => copy!(a, b),
            (CpuStorage::Bool(a), CpuStorage::Bool(b)) => copy!(a, b),
            _ => unreachable!("converted above"),
        }
        Ok(())
    }
}

impl std::fmt::Debug for Tensor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "Tensor[dims {:?}, {:?}{}]",
            self.dims(),
            self.dtype(),
            if self.requires_grad() {
                ", requires_grad"
            } else {
                ""
            }
        )
    }
}

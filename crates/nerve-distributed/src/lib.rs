//! # nerve-distributed
//!
//! Data-parallel training as PyTorch's `DistributedDataParallel` does it, on an existing
//! collective engine: every process (rank) holds a full copy of the model, works on its shard
//! of each global batch, and the gradients are averaged across ranks with all-reduce before
//! each optimizer step, so every rank takes the same step.
//!
//! - [`Collective`]: the operations used (sum all-reduce, broadcast), with two engines:
//!   [`SingleProcess`] (always built) and `MpiGroup` (cargo feature `mpi`: the `mpi` crate over
//!   the system's Open MPI, launched with `mpirun`).
//! - [`DataParallel`]: broadcast the parameters from rank 0 at the start, and all-reduce the
//!   gradients in buckets of [`DataParallel::DEFAULT_BUCKET_MB`] MiB (PyTorch's
//!   `bucket_cap_mb`).
//! - [`init`]: the process group of `nerve train --distributed`.
#![warn(missing_docs)]

use std::cell::RefCell;

use nerve_core::{DType, Tensor};

/// Errors of distributed training.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A tensor operation failed.
    #[error(transparent)]
    Core(#[from] nerve_core::Error),
    /// The collective engine is not available (built without it, or already started).
    #[error("{0}")]
    Unavailable(String),
    /// Parameters this module cannot exchange (not f32, not contiguous).
    #[error("data parallel: {0}")]
    Unsupported(String),
}

/// The result type of this crate.
pub type Result<T> = std::result::Result<T, Error>;

/// The collective operations data-parallel training needs. Every rank must call the same
/// operations in the same order with buffers of the same length (as with MPI).
pub trait Collective {
    /// This process's rank, `0..size()`.
    fn rank(&self) -> usize;
    /// The number of processes.
    fn size(&self) -> usize;
    /// Replace `buf` by its element-wise sum over all ranks (every rank gets the same sum).
    fn all_reduce_sum_f32(&self, buf: &mut [f32]);
    /// [`Collective::all_reduce_sum_f32`] for f64 (statistics, flags).
    fn all_reduce_sum_f64(&self, buf: &mut [f64]);
    /// Replace `buf` on every rank by rank `root`'s.
    fn broadcast_f32(&self, buf: &mut [f32], root: usize);
    /// The engine's name, for messages (`single process`, `MPI`).
    fn name(&self) -> String;
}

/// One process alone: every collective is the identity.
#[derive(Clone, Copy, Debug, Default)]
pub struct SingleProcess;

impl Collective for SingleProcess {
    fn rank(&self) -> usize {
        0
    }
    fn size(&self) -> usize {
        1
    }
    fn all_reduce_sum_f32(&self, _buf: &mut [f32]) {}
    fn all_reduce_sum_f64(&self, _buf: &mut [f64]) {}
    fn broadcast_f32(&self, _buf: &mut [f32], _root: usize) {}
    fn name(&self) -> String {
        "single process".into()
    }
}

#[cfg(feature = "mpi")]
mod mpi_group {
    use super::{Collective, Error, Result};
    use mpi::collective::SystemOperation;
    use mpi::environment::Universe;
    use mpi::topology::SimpleCommunicator;
    use mpi::traits::*;
    use std::cell::RefCell;

    /// `MPI_COMM_WORLD` of a job started by `mpirun` (or a single process without it).
    /// MPI is finalized when this is dropped.
    pub struct MpiGroup {
        // Dropped before the universe, which finalizes MPI.
        world: SimpleCommunicator,
        /// A copy of the send buffer: the safe API has no in-place all-reduce.
        send_f32: RefCell<Vec<f32>>,
        send_f64: RefCell<Vec<f64>>,
        _universe: Universe,
    }

    impl MpiGroup {
        /// Initialise MPI (once per process). A panic on any rank then ends the process
        /// at once with status 101 instead of unwinding into `MPI_Finalize`, which would wait
        /// forever for the ranks blocked in a collective: `mpirun` sees the failed rank and
        /// stops the job.
        pub fn init() -> Result<Self> {
            let universe = mpi::initialize().ok_or_else(|| {
                Error::Unavailable("MPI was already initialised in this process".into())
            })?;
            let world = universe.world();
            if world.size() > 1 {
                let default = std::panic::take_hook();
                std::panic::set_hook(Box::new(move |info| {
                    default(info);
                    std::process::exit(101);
                }));
            }
            Ok(Self {
                world,
                send_f32: RefCell::new(Vec::new()),
                send_f64: RefCell::new(Vec::new()),
                _universe: universe,
            })
        }
    }

    impl Collective for MpiGroup {
        fn rank(&self) -> usize {
            self.world.rank() as usize
        }
        fn size(&self) -> usize {
            self.world.size() as usize
        }
        fn all_reduce_sum_f32(&self, buf: &mut [f32]) {
            let mut send = self.send_f32.borrow_mut();
            send.clear();
            send.extend_from_slice(buf);
            self.world
                .all_reduce_into(&send[..], buf, SystemOperation::sum());
        }
        fn all_reduce_sum_f64(&self, buf: &mut [f64]) {
            let mut send = self.send_f64.borrow_mut();
            send.clear();
            send.extend_from_slice(buf);
            self.world
                .all_reduce_into(&send[..], buf, SystemOperation::sum());
        }
        fn broadcast_f32(&self, buf: &mut [f32], root: usize) {
            self.world.process_at_rank(root as i32).broadcast_into(buf);
        }
        fn name(&self) -> String {
            let lib = mpi::environment::library_version().unwrap_or_default();
            format!("MPI ({})", lib.lines().next().unwrap_or("").trim())
        }
    }
}

#[cfg(feature = "mpi")]
pub use mpi_group::MpiGroup;

/// Whether this nerve was built with MPI (the `mpi` feature).
pub const HAS_MPI: bool = cfg!(feature = "mpi");

/// The process group: with `distributed`, MPI's world (one rank when not started by
/// `mpirun`); otherwise a [`SingleProcess`]. Without the `mpi` feature, `distributed` is an
/// error that says how to build with it.
pub fn init(distributed: bool) -> Result<Box<dyn Collective>> {
    if !distributed {
        return Ok(Box::new(SingleProcess));
    }
    #[cfg(feature = "mpi")]
    {
        Ok(Box::new(MpiGroup::init()?))
    }
    #[cfg(not(feature = "mpi"))]
    {
        Err(Error::Unavailable(
            "--distributed: this nerve was built without MPI; build it with `cargo build \
             --release -p nerve-cli --features mpi` (needs Open MPI and libclang: `apt-get \
             install libopenmpi-dev openmpi-bin libclang-dev`)"
                .into(),
        ))
    }
}

/// Data parallelism over a [`Collective`]: parameter broadcast and bucketed gradient
/// averaging (PyTorch's `DistributedDataParallel` without the autograd hooks: the all-reduce
/// runs after the backward pass, not overlapped with it).
pub struct DataParallel {
    group: Box<dyn Collective>,
    bucket_elems: usize,
    buf: RefCell<Vec<f32>>,
}

impl DataParallel {
    /// PyTorch's default bucket size (`bucket_cap_mb=25`).
    pub const DEFAULT_BUCKET_MB: f64 = 25.0;

    /// Data parallelism over `group` with buckets of [`Self::DEFAULT_BUCKET_MB`] MiB.
    pub fn new(group: Box<dyn Collective>) -> Self {
        Self::with_bucket_mb(group, Self::DEFAULT_BUCKET_MB)
    }

    /// Data parallelism with buckets of `mb` MiB of f32 gradients (at least one element).
    pub fn with_bucket_mb(group: Box<dyn Collective>, mb: f64) -> Self {
        let bucket_elems = ((mb * (1 << 20) as f64 / 4.0) as usize).max(1);
        Self {
            group,
            bucket_elems,
            buf: RefCell::new(Vec::new()),
        }
    }

    /// The process group.
    pub fn group(&self) -> &dyn Collective {
        self.group.as_ref()
    }

    /// This rank.
    pub fn rank(&self) -> usize {
        self.group.rank()
    }

    /// The number of ranks.
    pub fn size(&self) -> usize {
        self.group.size()
    }

    /// Whether this is rank 0, the one that writes files and prints.
    pub fn is_main(&self) -> bool {
        self.group.rank() == 0
    }

    /// Bytes each rank sends into the gradient all-reduce of one step: 4 per trainable
    /// f32 element.
    pub fn gradient_bytes(params: &[Tensor]) -> usize {
        params.iter().map(|p| p.numel() * 4).sum()
    }

    /// Make every rank's parameters equal to rank 0's (before the first step, as DDP's
    /// constructor does).
    pub fn broadcast_parameters(&self, params: &[Tensor]) -> Result<()> {
        if self.size() == 1 {
            return Ok(());
        }
        check_f32(params)?;
        for bucket in self.buckets(params) {
            let mut buf = self.buf.borrow_mut();
            fill(&mut buf, bucket, |p| Ok(Some(p.clone())))?;
            self.group.broadcast_f32(&mut buf, 0);
            let mut off = 0;
            for p in bucket {
                let n = p.numel();
                p.with_data_mut::<f32, _>(|d| d.copy_from_slice(&buf[off..off + n]))?;
                off += n;
            }
        }
        Ok(())
    }

    /// Replace every parameter's gradient by its mean over the ranks (a parameter without
    /// a gradient on this rank contributes zeros). Returns the bytes this rank all-reduced.
    pub fn all_reduce_gradients(&self, params: &[Tensor]) -> Result<usize> {
        let world = self.size();
        if world == 1 {
            return Ok(0);
        }
        check_f32(params)?;
        let scale = 1.0 / world as f32;
        let mut bytes = 0;
        for bucket in self.buckets(params) {
            let mut buf = self.buf.borrow_mut();
            fill(&mut buf, bucket, |p| Ok(p.grad()))?;
            self.group.all_reduce_sum_f32(&mut buf);
            bytes += buf.len() * 4;
            let mut off = 0;
            for p in bucket {
                let n = p.numel();
                let mean: Vec<f32> = buf[off..off + n].iter().map(|g| g * scale).collect();
                // New tensors: a gradient may share its storage with another's.
                p.set_grad(Some(Tensor::from_vec(mean, p.dims())?));
                off += n;
            }
        }
        Ok(bytes)
    }

    /// Sum `values` over the ranks (loss sums, sample counts, stop flags).
    pub fn all_reduce_sum(&self, values: &mut [f64]) {
        if self.size() > 1 {
            self.group.all_reduce_sum_f64(values);
        }
    }

    /// The number of all-reduce buckets `params` take.
    pub fn bucket_count(&self, params: &[Tensor]) -> usize {
        self.buckets(params).len()
    }

    /// `params` cut into runs of at most one bucket's elements (a larger parameter alone).
    fn buckets<'p>(&self, params: &'p [Tensor]) -> Vec<&'p [Tensor]> {
        let mut out = Vec::new();
        let (mut start, mut elems) = (0, 0);
        for (i, p) in params.iter().enumerate() {
            if i > start && elems + p.numel() > self.bucket_elems {
                out.push(&params[start..i]);
                (start, elems) = (i, 0);
            }
            elems += p.numel();
        }
        if start < params.len() {
            out.push(&params[start..]);
        }
        out
    }
}

/// Refuse parameters that are not f32.
fn check_f32(params: &[Tensor]) -> Result<()> {
    if let Some(p) = params.iter().find(|p| p.dtype() != DType::F32) {
        return Err(Error::Unsupported(format!(
            "parameters must be f32, found a {:?} one of shape {:?}",
            p.dtype(),
            p.dims()
        )));
    }
    Ok(())
}

/// Concatenate `what(p)` (zeros where `None`) of each parameter of `bucket` into `buf`.
fn fill(
    buf: &mut Vec<f32>,
    bucket: &[Tensor],
    what: impl Fn(&Tensor) -> Result<Option<Tensor>>,
) -> Result<()> {
    buf.clear();
    for p in bucket {
        match what(p)? {
            Some(t) => {
                if t.dims() != p.dims() {
                    return Err(Error::Unsupported(format!(
                        "a gradient of shape {:?} for a parameter of shape {:?}",
                        t.dims(),
                        p.dims()
                    )));
                }
                t.to_dtype(DType::F32)?
                    .with_data::<f32, _>(|d| buf.extend_from_slice(d))?
            }
            None => buf.resize(buf.len() + p.numel(), 0.0),
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `size` identical ranks: a sum multiplies by `size`; a broadcast adds 1.
    struct Replicas {
        size: usize,
    }

    impl Collective for Replicas {
        fn rank(&self) -> usize {
            0
        }
        fn size(&self) -> usize {
            self.size
        }
        fn all_reduce_sum_f32(&self, buf: &mut [f32]) {
            buf.iter_mut().for_each(|x| *x *= self.size as f32);
        }
        fn all_reduce_sum_f64(&self, buf: &mut [f64]) {
            buf.iter_mut().for_each(|x| *x *= self.size as f64);
        }
        fn broadcast_f32(&self, buf: &mut [f32], _root: usize) {
            buf.iter_mut().for_each(|x| *x += 1.0);
        }
        fn name(&self) -> String {
            "replicas".into()
        }
    }

    fn params() -> Vec<Tensor> {
        [vec![3, 4], vec![5], vec![2, 2, 2], vec![1]]
            .into_iter()
            .enumerate()
            .map(|(i, d)| {
                let n: usize = d.iter().product();
                let v: Vec<f32> = (0..n).map(|j| (i * 100 + j) as f32).collect();
                Tensor::from_vec(v, d).unwrap().requires_grad_(true)
            })
            .collect()
    }

    #[test]
    fn gradients_are_averaged_bucket_by_bucket() {
        let ps = params();
        for (i, p) in ps.iter().enumerate() {
            if i != 2 {
                p.set_grad(Some(p.mul_scalar(0.5).unwrap()));
            }
        }
        // 6 elements per bucket: [12] alone, [5], [8] alone, [1].
        let dp =
            DataParallel::with_bucket_mb(Box::new(Replicas { size: 4 }), 24.0 / (1 << 20) as f64);
        assert_eq!(dp.buckets(&ps).len(), 4);
        let bytes = dp.all_reduce_gradients(&ps).unwrap();
        assert_eq!(bytes, DataParallel::gradient_bytes(&ps));
        assert_eq!(bytes, (12 + 5 + 8 + 1) * 4);
        for (i, p) in ps.iter().enumerate() {
            let g: Vec<f32> = p.grad().unwrap().to_vec().unwrap();
            let want: Vec<f32> = if i == 2 {
                vec![0.0; 8]
            } else {
                p.to_vec::<f32>().unwrap().iter().map(|x| x * 0.5).collect()
            };
            assert_eq!(g, want, "parameter {i}");
        }
        // One bucket for everything by default.
        let dp = DataParallel::new(Box::new(Replicas { size: 2 }));
        assert_eq!(dp.buckets(&ps).len(), 1);
    }

    #[test]
    fn broadcast_writes_the_parameters_in_place() {
        let ps = params();
        let before: Vec<Vec<f32>> = ps.iter().map(|p| p.to_vec().unwrap()).collect();
        let dp =
            DataParallel::with_bucket_mb(Box::new(Replicas { size: 2 }), 40.0 / (1 << 20) as f64);
        dp.broadcast_parameters(&ps).unwrap();
        for (p, b) in ps.iter().zip(before) {
            let after: Vec<f32> = p.to_vec().unwrap();
            assert_eq!(after, b.iter().map(|x| x + 1.0).collect::<Vec<_>>());
        }
    }

    #[test]
    fn a_single_process_changes_nothing() {
        let ps = params();
        ps[0].set_grad(Some(Tensor::ones([3, 4])));
        let dp = DataParallel::new(init(false).unwrap());
        assert_eq!((dp.rank(), dp.size(), dp.is_main()), (0, 1, true));
        assert_eq!(dp.all_reduce_gradients(&ps).unwrap(), 0);
        assert!(ps[1].grad().is_none());
        let mut v = [1.0, 2.0];
        dp.all_reduce_sum(&mut v);
        assert_eq!(v, [1.0, 2.0]);
    }

    #[test]
    fn other_dtypes_are_refused() {
        let p = Tensor::from_vec(vec![1.0f64, 2.0], [2])
            .unwrap()
            .requires_grad_(true);
        let dp = DataParallel::new(Box::new(Replicas { size: 2 }));
        let e = dp.all_reduce_gradients(&[p]).unwrap_err().to_string();
        assert!(e.contains("f32"), "{e}");
    }

    #[cfg(not(feature = "mpi"))]
    #[test]
    fn without_mpi_distributed_says_how_to_build() {
        let e = init(true).err().unwrap().to_string();
        assert!(
            e.contains("--features mpi") && e.contains("libopenmpi-dev"),
            "{e}"
        );
    }
}

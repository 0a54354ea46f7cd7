//! Mini-batches over a [`Dataset`]: shuffling, augmentation and background prefetch.

use std::sync::mpsc::{sync_channel, Receiver};
use std::sync::Arc;
use std::thread::JoinHandle;

use nerve_core::Tensor;
use rand::seq::SliceRandom;
use rand::SeedableRng;
use rand_pcg::Pcg64Mcg;

use crate::error::{DataError, Result};
use crate::{Augment, Dataset};

/// How many batches the prefetch thread may have ready ahead of the consumer.
const PREFETCH_DEPTH: usize = 2;

/// One process's part of every batch in data-parallel training: rank `rank` of `world`
/// takes rows `rank·n/world .. (rank+1)·n/world` of a batch of `n` (as even as can be; a
/// short last batch may leave a rank none).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Shard {
    /// This process, `0..world`.
    pub rank: usize,
    /// The number of processes.
    pub world: usize,
}

impl Default for Shard {
    /// The whole batch (one process).
    fn default() -> Self {
        Shard { rank: 0, world: 1 }
    }
}

impl Shard {
    /// This shard's rows of a batch of `n`.
    pub fn range(&self, n: usize) -> std::ops::Range<usize> {
        let w = self.world.max(1);
        self.rank * n / w..(self.rank + 1) * n / w
    }

    /// The factor on this shard's mean loss that makes the mean over the ranks of the
    /// gradients (what an all-reduce average gives) the gradient of the whole batch's mean
    /// loss: `rows · world / n` (1 for equal shards).
    pub fn loss_scale(&self, n: usize) -> f64 {
        if n == 0 {
            return 0.0;
        }
        (self.range(n).len() * self.world) as f64 / n as f64
    }
}

/// Iterates over a [`Dataset`] in mini-batches, one epoch at a time.
///
/// ```
/// use nerve_data::{digits, DataLoader};
///
/// let loader = DataLoader::new(digits(), 100).shuffle(7).drop_last(true);
/// assert_eq!(loader.num_batches(), 17);
/// for epoch in 0..2 {
///     for batch in loader.epoch(epoch) {
///         let (x, y) = batch?;
///         assert_eq!(x.dims(), &[100, 1, 8, 8]);
///         assert_eq!(y.dims(), &[100]);
///     }
/// }
/// # Ok::<(), nerve_data::DataError>(())
/// ```
#[derive(Clone, Debug)]
pub struct DataLoader {
    dataset: Arc<Dataset>,
    batch_size: usize,
    shuffle: bool,
    seed: u64,
    drop_last: bool,
    augment: Option<Augment>,
    prefetch: bool,
    shard: Shard,
}

impl DataLoader {
    /// A loader giving batches of `batch_size` samples (0 counts as 1) in data set order, without
    /// augmentation, keeping a last short batch, prefetching in a background thread.
    pub fn new(dataset: impl Into<Arc<Dataset>>, batch_size: usize) -> Self {
        DataLoader {
            dataset: dataset.into(),
            batch_size: batch_size.max(1),
            shuffle: false,
            seed: 0,
            drop_last: false,
            augment: None,
            prefetch: true,
            shard: Shard::default(),
        }
    }

    /// Shuffle each epoch with a generator seeded by `seed + epoch`: every epoch has a different
    /// order, and the same seed gives the same orders. The seed also drives augmentation.
    pub fn shuffle(mut self, seed: u64) -> Self {
        self.shuffle = true;
        self.seed = seed;
        self
    }

    /// Whether to drop the last batch if it is shorter than the batch size.
    pub fn drop_last(mut self, drop_last: bool) -> Self {
        self.drop_last = drop_last;
        self
    }

    /// Augment every sample (seeded by the shuffle seed, the epoch and the batch index).
    pub fn augment(mut self, augment: Augment) -> Self {
        self.augment = Some(augment);
        self
    }

    /// Whether to prepare batches in a background thread (the default) or on demand.
    /// Both give the same batches.
    pub fn prefetch(mut self, prefetch: bool) -> Self {
        self.prefetch = prefetch;
        self
    }

    /// Give only `shard`'s rows of each batch (data-parallel training): the batch size and
    /// the order stay those of the whole batch, so the shards of all ranks together are the
    /// batches one process would get.
    pub fn shard(mut self, shard: Shard) -> Self {
        self.shard = shard;
        self
    }

    /// The rows of batch `b` of an epoch, over all shards.
    pub fn batch_rows(&self, b: usize) -> usize {
        let n = self.dataset.len();
        (n.saturating_sub(b * self.batch_size)).min(self.batch_size)
    }

    /// The data set.
    pub fn dataset(&self) -> &Arc<Dataset> {
        &self.dataset
    }

    /// The batch size.
    pub fn batch_size(&self) -> usize {
        self.batch_size
    }

    /// The number of batches in one epoch.
    pub fn num_batches(&self) -> usize {
        let n = self.dataset.len();
        if self.drop_last {
            n / self.batch_size
        } else {
            n.div_ceil(self.batch_size)
        }
    }

    /// The batches of epoch `epoch`: `(x, y)` with `x` of shape `[b, ...sample_dims]` (f32) and
    /// `y` of shape `[b]` (i64). Each sample appears at most once (exactly once unless
    /// `drop_last` drops some). After an error the iterator ends. Dropping the iterator early
    /// stops the prefetch thread.
    pub fn epoch(&self, epoch: usize) -> Batches {
        self.epoch_from(epoch, 0)
    }

    /// The batches of epoch `epoch` from batch index `first` on (the same batches as
    /// [`DataLoader::epoch`] gives after `first` of them, without building those): how a
    /// resumed run continues an epoch where it stopped.
    pub fn epoch_from(&self, epoch: usize, first: usize) -> Batches {
        let mut order: Vec<usize> = (0..self.dataset.len()).collect();
        if self.shuffle {
            order.shuffle(&mut Pcg64Mcg::seed_from_u64(
                self.seed.wrapping_add(epoch as u64),
            ));
        }
        let total = self.num_batches();
        let first = first.min(total);
        let producer = Arc::new(Producer {
            dataset: Arc::clone(&self.dataset),
            order,
            batch_size: self.batch_size,
            augment: self.augment,
            seed: self.seed,
            epoch,
            shard: self.shard,
        });
        let source = if self.prefetch && first < total {
            spawn(Arc::clone(&producer), first..total).unwrap_or(Source::Inline(producer))
        } else {
            Source::Inline(producer)
        };
        Batches {
            dataset: Arc::clone(&self.dataset),
            next: first,
            total,
            source,
        }
    }
}

type RawBatch = Result<(Vec<f32>, Vec<i64>)>;

/// Everything needed to build the batches of one epoch.
struct Producer {
    dataset: Arc<Dataset>,
    order: Vec<usize>,
    batch_size: usize,
    augment: Option<Augment>,
    seed: u64,
    epoch: usize,
    shard: Shard,
}

impl Producer {
    fn make(&self, b: usize) -> RawBatch {
        let start = (b * self.batch_size).min(self.order.len());
        let end = (start + self.batch_size).min(self.order.len());
        let rows = self.shard.range(end - start);
        let Some(aug) = &self.augment else {
            return Ok(self
                .dataset
                .gather_raw(&self.order[start + rows.start..start + rows.end]));
        };
        // Augmentation draws along the whole batch: augment it all, then cut the shard.
        let (mut x, y) = self.dataset.gather_raw(&self.order[start..end]);
        aug.apply_batch(&mut x, self.dataset.sample_dims(), self.seed, self.epoch, b)?;
        if rows.len() == end - start {
            return Ok((x, y));
        }
        let len: usize = self.dataset.sample_dims().iter().product();
        Ok((
            x[rows.start * len..rows.end * len].to_vec(),
            y[rows.clone()].to_vec(),
        ))
    }
}

enum Source {
    Inline(Arc<Producer>),
    Thread {
        rx: Receiver<RawBatch>,
        handle: JoinHandle<()>,
    },
    Done,
}

/// Start the prefetch thread for the batches `range`; `None` if the thread cannot be created.
fn spawn(producer: Arc<Producer>, range: std::ops::Range<usize>) -> Option<Source> {
    let (tx, rx) = sync_channel(PREFETCH_DEPTH);
    let handle = std::thread::Builder::new()
        .name("nerve-data-prefetch".into())
        .spawn(move || {
            for b in range {
                let batch = producer.make(b);
                let failed = batch.is_err();
                // A send error means the consumer is gone: stop.
                if tx.send(batch).is_err() || failed {
                    break;
                }
            }
        })
        .ok()?;
    Some(Source::Thread { rx, handle })
}

/// The batches of one epoch; see [`DataLoader::epoch`].
pub struct Batches {
    dataset: Arc<Dataset>,
    next: usize,
    total: usize,
    source: Source,
}

impl Batches {
    /// Stop producing: disconnect and join the prefetch thread, if any.
    fn finish(&mut self) {
        self.next = self.total;
        if let Source::Thread { rx, handle } = std::mem::replace(&mut self.source, Source::Done) {
            drop(rx); // unblocks a pending send, which then fails and ends the thread
            let _ = handle.join();
        }
    }
}

impl Iterator for Batches {
    type Item = Result<(Tensor, Tensor)>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.next >= self.total {
            self.finish();
            return None;
        }
        let raw = match &self.source {
            Source::Inline(p) => p.make(self.next),
            Source::Thread { rx, .. } => rx.recv().unwrap_or(Err(DataError::Worker)),
            Source::Done => return None,
        };
        self.next += 1;
        let item = raw.and_then(|(x, y)| self.dataset.to_tensors(x, y));
        if item.is_err() {
            self.finish();
        }
        Some(item)
    }

    fn size_hint(&self) -> (usize, Option<usize>) {
        let left = self.total - self.next;
        (left, Some(left))
    }
}

impl ExactSizeIterator for Batches {}

impl std::iter::FusedIterator for Batches {}

impl Drop for Batches {
    fn drop(&mut self) {
        self.finish();
    }
}

impl std::fmt::Debug for Batches {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Batches")
            .field("next", &self.next)
            .field("total", &self.total)
            .finish_non_exhaustive()
    }
}

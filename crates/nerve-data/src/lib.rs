//! # nerve-data
//!
//! Data sets and loaders for nerve:
//!
//! * [`idx`]: the IDX binary format (MNIST, Fashion-MNIST), plain or gzip-compressed;
//! * [`mnist`]: MNIST-style image/label pairs as a [`Dataset`];
//! * [`csv`]: numeric tabular data with an integer label column;
//! * [`digits()`]: the scikit-learn 8x8 digits set, embedded in the crate;
//! * [`text`]: character-level text for language models ([`CharTokenizer`], windows);
//! * [`tokenizer`]: subword tokenizers of pretrained models ([`Tokenizer`]: `tokenizer.json`
//!   or a GGUF vocabulary, chat templates, streaming decoding);
//! * [`vision`]: photos for image classifiers (JPEG/PNG decoding, PIL-exact resize, centre
//!   crop, normalisation);
//! * [`Dataset`]: an in-memory labelled set (split, subset, normalize, batch);
//! * [`DataLoader`]: shuffled mini-batches with augmentation and background prefetch.
//!
//! ```
//! use nerve_data::{digits, Augment, DataLoader};
//!
//! let (train, _val) = digits().split(0.8, 0);
//! let loader = DataLoader::new(train, 64)
//!     .shuffle(42)
//!     .augment(Augment { pad: 1, hflip: false });
//! for batch in loader.epoch(0) {
//!     let (x, y) = batch?;
//!     assert_eq!(&x.dims()[1..], &[1, 8, 8]);
//!     assert_eq!(x.dims()[0], y.dims()[0]);
//! }
//! # Ok::<(), nerve_data::DataError>(())
//! ```
#![warn(missing_docs)]

pub mod augment;
pub mod csv;
pub mod dataset;
mod digits;
pub mod error;
pub mod idx;
pub mod image;
pub mod loader;
pub mod mnist;
pub mod text;
pub mod tokenizer;
pub mod vision;

pub use augment::Augment;
pub use csv::{load_csv, CsvOptions};
pub use dataset::Dataset;
pub use digits::digits;
pub use error::{DataError, Result};
pub use idx::{read_idx, IdxArray};
pub use loader::{Batches, DataLoader, Shard};
pub use mnist::load_mnist;
pub use text::{CharTokenizer, TextSplits};
pub use tokenizer::{BpeVocab, ChatMessage, TokenStream, Tokenizer};

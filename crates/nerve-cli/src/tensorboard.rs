//! TensorBoard event files for scalar metrics.
//!
//! An event file is a sequence of TFRecords, each holding one serialised `tensorflow.Event`
//! protocol buffer. A record is laid out as
//!
//! ```text
//! u64 LE  length of the data
//! u32 LE  masked CRC32C of those 8 length bytes
//! [u8]    data (the Event)
//! u32 LE  masked CRC32C of the data
//! ```
//!
//! where `masked(crc) = ((crc >> 15) | (crc << 17)) + 0xa282ead8` (wrapping). The first record
//! of a file is an Event whose `file_version` is `brain.Event:2`; each scalar after it is an
//! Event with a `step` and a `Summary` holding one `Value { tag, simple_value }`.
//!
//! The messages are the few fields of `tensorflow/core/util/event.proto` and
//! `tensorflow/core/framework/summary.proto` that scalars need, derived with prost by hand
//! (no protoc); unknown fields of files written by other tools are skipped when reading.

use std::fs::{File, OpenOptions};
use std::io::{BufWriter, ErrorKind, Write};
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result};
use prost::Message;

/// The `file_version` of the first Event of a file, as TensorFlow writes it.
const FILE_VERSION: &str = "brain.Event:2";

/// Bytes of a record before its data: the length and its CRC.
const HEADER_LEN: usize = 8 + 4;

/// Bytes of a record after its data: the data's CRC.
const FOOTER_LEN: usize = 4;

/// CRC-32C (Castagnoli), the checksum of TFRecords.
const CRC32C: crc::Crc<u32> = crc::Crc::<u32>::new(&crc::CRC_32_ISCSI);

/// `tensorflow.Event`: the fields scalars use.
#[derive(Clone, PartialEq, prost::Message)]
struct Event {
    /// Seconds since the Unix epoch.
    #[prost(double, tag = "1")]
    wall_time: f64,
    #[prost(int64, tag = "2")]
    step: i64,
    /// One member of the `what` oneof; `optional` so that it is written whenever it is set.
    #[prost(string, optional, tag = "3")]
    file_version: Option<String>,
    /// One member of the `what` oneof.
    #[prost(message, optional, tag = "5")]
    summary: Option<Summary>,
}

/// `tensorflow.Summary`.
#[derive(Clone, PartialEq, prost::Message)]
struct Summary {
    #[prost(message, repeated, tag = "1")]
    value: Vec<SummaryValue>,
}

/// `tensorflow.Summary.Value`: a tag and a scalar.
#[derive(Clone, PartialEq, prost::Message)]
struct SummaryValue {
    #[prost(string, tag = "1")]
    tag: String,
    /// A member of the `value` oneof, so it must be written even when it is 0.0 (TensorBoard
    /// asks `HasField("simple_value")`), which a plain proto3 `float` would not be.
    #[prost(float, optional, tag = "2")]
    simple_value: Option<f32>,
}

/// The CRC32C of `data`, masked as TFRecords store it.
fn masked_crc32c(data: &[u8]) -> u32 {
    let crc = CRC32C.checksum(data);
    // `(crc >> 15) | (crc << 17)`
    crc.rotate_right(15).wrapping_add(0xa282_ead8)
}

/// Seconds since the Unix epoch, with the fraction.
fn wall_time() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

/// This machine's name from `/etc/hostname`, or `localhost` when there is none.
fn hostname() -> String {
    std::fs::read_to_string("/etc/hostname")
        .ok()
        .map(|s| s.trim().to_owned())
        .filter(|s| !s.is_empty() && !s.contains(['/', '\\']))
        .unwrap_or_else(|| "localhost".to_owned())
}

/// Writes scalar metrics to a new TensorBoard event file in a directory.
///
/// Each [`add_scalar`](Self::add_scalar) is flushed to the file at once, so a TensorBoard
/// watching the directory sees it during training and a killed run loses nothing written.
pub struct EventWriter {
    path: PathBuf,
    out: BufWriter<File>,
}

impl EventWriter {
    /// Creates `dir` (and its parents) if need be and a new event file in it, named as
    /// TensorFlow names them, `events.out.tfevents.<unix seconds>.<hostname>`, and writes the
    /// file's version record.
    ///
    /// An existing file is never overwritten: when a writer was already created in the same
    /// directory in the same second, `.1`, `.2`, … is appended to the name (TensorBoard reads
    /// every file whose name contains `tfevents`).
    pub fn create(dir: &Path) -> Result<Self> {
        std::fs::create_dir_all(dir)
            .with_context(|| format!("creating the directory {}", dir.display()))?;
        let wall_time = wall_time();
        let base = format!("events.out.tfevents.{}.{}", wall_time as u64, hostname());
        let mut n = 0u32;
        let (path, file) = loop {
            let name = if n == 0 {
                base.clone()
            } else {
                format!("{base}.{n}")
            };
            let path = dir.join(name);
            match OpenOptions::new().write(true).create_new(true).open(&path) {
                Ok(file) => break (path, file),
                Err(e) if e.kind() == ErrorKind::AlreadyExists && n < 1000 => n += 1,
                Err(e) => {
                    return Err(e).with_context(|| format!("creating {}", path.display()));
                }
            }
        };
        let mut writer = EventWriter {
            path,
            out: BufWriter::new(file),
        };
        writer.write_event(&Event {
            wall_time,
            file_version: Some(FILE_VERSION.to_owned()),
            ..Event::default()
        })?;
        writer.flush()?;
        Ok(writer)
    }

    /// Appends the scalar `value` of the metric `tag` (for example `loss/train`; TensorBoard
    /// groups tags by what comes before the first `/`) at `step`, and flushes the file.
    ///
    /// The value is stored as an `f32`, as TensorBoard's `simple_value` is.
    pub fn add_scalar(&mut self, tag: &str, value: f64, step: i64) -> Result<()> {
        self.write_event(&Event {
            wall_time: wall_time(),
            step,
            summary: Some(Summary {
                value: vec![SummaryValue {
                    tag: tag.to_owned(),
                    simple_value: Some(value as f32),
                }],
            }),
            ..Event::default()
        })?;
        self.flush()
    }

    /// Writes what is buffered to the file.
    pub fn flush(&mut self) -> Result<()> {
        self.out
            .flush()
            .with_context(|| format!("writing {}", self.path.display()))
    }

    /// Appends `event` as one record (buffered).
    fn write_event(&mut self, event: &Event) -> Result<()> {
        let data = event.encode_to_vec();
        let len = (data.len() as u64).to_le_bytes();
        let mut record = Vec::with_capacity(HEADER_LEN + data.len() + FOOTER_LEN);
        record.extend_from_slice(&len);
        record.extend_from_slice(&masked_crc32c(&len).to_le_bytes());
        record.extend_from_slice(&data);
        record.extend_from_slice(&masked_crc32c(&data).to_le_bytes());
        self.out
            .write_all(&record)
            .with_context(|| format!("writing {}", self.path.display()))
    }
}

/// Reads the scalars of the event file at `path` as `(tag, step, value)`, in file order.
///
/// Both CRCs of every record are checked; a bad CRC, a truncated record or an undecodable
/// Event is an error naming the file and the byte offset of the record. Values that are not
/// scalars (images, histograms, tensors written by other tools) are skipped.
#[cfg(test)]
pub fn read_scalars(path: &Path) -> Result<Vec<(String, i64, f32)>> {
    let bytes = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    let mut scalars = Vec::new();
    let mut offset = 0usize;
    while offset < bytes.len() {
        let event = read_record(&bytes, offset)
            .with_context(|| format!("{}: record at byte offset {offset}", path.display()))?;
        offset = event.1;
        let event = event.0;
        for value in event.summary.into_iter().flat_map(|s| s.value) {
            if let Some(v) = value.simple_value {
                scalars.push((value.tag, event.step, v));
            }
        }
    }
    Ok(scalars)
}

/// Decodes the record starting at `offset` of `bytes`; returns its Event and the offset of the
/// next record.
#[cfg(test)]
fn read_record(bytes: &[u8], offset: usize) -> Result<(Event, usize)> {
    let rest = &bytes[offset..];
    if rest.len() < HEADER_LEN {
        anyhow::bail!(
            "truncated record: {} bytes left, a header takes {HEADER_LEN}",
            rest.len()
        );
    }
    let len_bytes = &rest[..8];
    let stored = u32::from_le_bytes(rest[8..12].try_into().unwrap());
    if masked_crc32c(len_bytes) != stored {
        anyhow::bail!("bad CRC of the record length");
    }
    let len = u64::from_le_bytes(len_bytes.try_into().unwrap());
    let available = (rest.len() - HEADER_LEN) as u64;
    if len.saturating_add(FOOTER_LEN as u64) > available {
        anyhow::bail!(
            "truncated record: {len} data bytes and a CRC announced, {available} bytes left"
        );
    }
    let len = len as usize;
    let data = &rest[HEADER_LEN..HEADER_LEN + len];
    let crc_at = HEADER_LEN + len;
    let stored = u32::from_le_bytes(rest[crc_at..crc_at + FOOTER_LEN].try_into().unwrap());
    if masked_crc32c(data) != stored {
        anyhow::bail!("bad CRC of the record data ({len} bytes)");
    }
    let event = Event::decode(data).context("decoding the Event")?;
    Ok((event, offset + crc_at + FOOTER_LEN))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A fresh directory under the system's temporary one.
    fn temp_dir(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("nerve-tb-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        dir
    }

    /// The standard CRC-32C check value, and the masking of TFRecords on top of it.
    #[test]
    fn crc32c_test_vector() {
        assert_eq!(CRC32C.checksum(b"123456789"), 0xE306_9283);
        // Masked as TFRecords store it (the same as TensorBoard's `masked_crc32c`).
        assert_eq!(masked_crc32c(b"123456789"), 0xC78A_B0E5);
        // CRC-32C of 32 zero bytes (RFC 3720, B.4).
        assert_eq!(CRC32C.checksum(&[0u8; 32]), 0x8A91_36AA);
    }

    #[test]
    fn round_trip() {
        let dir = temp_dir("round-trip");
        let mut writer = EventWriter::create(&dir).unwrap();
        let name = writer.path.as_path().file_name().unwrap().to_str().unwrap();
        assert!(name.starts_with("events.out.tfevents."), "{name}");
        writer.add_scalar("loss/train", 2.5, 0).unwrap();
        writer.add_scalar("loss/train", 0.0, 1).unwrap();
        writer.add_scalar("accuracy/valid", 0.875, 1).unwrap();
        writer.add_scalar("lr", 1e-3, -1).unwrap();
        writer.add_scalar("big", 1e300, i64::MAX).unwrap();
        let path = writer.path.as_path().to_owned();
        drop(writer);

        let scalars = read_scalars(&path).unwrap();
        assert_eq!(
            scalars,
            vec![
                ("loss/train".to_owned(), 0, 2.5),
                ("loss/train".to_owned(), 1, 0.0),
                ("accuracy/valid".to_owned(), 1, 0.875),
                ("lr".to_owned(), -1, 1e-3f32),
                ("big".to_owned(), i64::MAX, f32::INFINITY),
            ]
        );

        // The first record is the version Event.
        let bytes = std::fs::read(&path).unwrap();
        let (first, _) = read_record(&bytes, 0).unwrap();
        assert_eq!(first.file_version.as_deref(), Some(FILE_VERSION));
        assert!(first.wall_time > 1.6e9, "{}", first.wall_time);

        // A second writer in the same second gets a file of its own.
        let other = EventWriter::create(&dir).unwrap();
        assert_ne!(other.path.as_path(), path);
        assert_eq!(read_scalars(other.path.as_path()).unwrap(), vec![]);
        assert_eq!(read_scalars(&path).unwrap().len(), 5);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn corruption_is_detected() {
        let dir = temp_dir("corrupt");
        let mut writer = EventWriter::create(&dir).unwrap();
        writer.add_scalar("loss", 1.0, 7).unwrap();
        let path = writer.path.as_path().to_owned();
        drop(writer);
        let good = std::fs::read(&path).unwrap();
        let first_len =
            HEADER_LEN + u64::from_le_bytes(good[..8].try_into().unwrap()) as usize + FOOTER_LEN;

        // Every single flipped bit, wherever it is, is an error rather than a wrong value.
        for i in 0..good.len() {
            let mut bad = good.clone();
            bad[i] ^= 0x10;
            std::fs::write(&path, &bad).unwrap();
            let err = format!("{:#}", read_scalars(&path).unwrap_err());
            assert!(err.contains(&path.display().to_string()), "{err}");
            let offset = if i < first_len { 0 } else { first_len };
            assert!(
                err.contains(&format!("byte offset {offset}")),
                "byte {i}: {err}"
            );
            assert!(err.contains("bad CRC"), "byte {i}: {err}");
        }

        // A record cut short anywhere, in its header or after it.
        for cut in [good.len() - 1, first_len + 5, first_len + HEADER_LEN + 1] {
            std::fs::write(&path, &good[..cut]).unwrap();
            let err = format!("{:#}", read_scalars(&path).unwrap_err());
            assert!(err.contains("truncated record"), "cut at {cut}: {err}");
            assert!(err.contains(&format!("byte offset {first_len}")), "{err}");
        }

        // Cut at a record boundary, the file just ends there.
        std::fs::write(&path, &good[..first_len]).unwrap();
        assert_eq!(read_scalars(&path).unwrap(), vec![]);
        std::fs::write(&path, &good).unwrap();
        assert_eq!(
            read_scalars(&path).unwrap(),
            vec![("loss".to_owned(), 7, 1.0)]
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn missing_file_is_named() {
        let path = temp_dir("missing").join("events.out.tfevents.0.none");
        let err = format!("{:#}", read_scalars(&path).unwrap_err());
        assert!(err.contains(&path.display().to_string()), "{err}");
    }

    /// Writes an event file into `NERVE_TB_SAMPLE_DIR` for checking with the real TensorBoard
    /// (`tools/check_tensorboard.py`); skipped when it is unset.
    #[test]
    fn sample_for_tensorboard() {
        let Some(dir) = std::env::var_os("NERVE_TB_SAMPLE_DIR") else {
            return;
        };
        let mut writer = EventWriter::create(Path::new(&dir)).unwrap();
        for step in 0..5 {
            writer
                .add_scalar("loss/train", 2.0 / (step + 1) as f64, step)
                .unwrap();
            writer
                .add_scalar("accuracy/valid", 0.25 * step as f64, step)
                .unwrap();
        }
        println!("wrote {}", writer.path.as_path().display());
    }
}

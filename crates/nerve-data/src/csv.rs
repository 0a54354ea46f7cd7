//! Numeric tabular data from CSV files, one sample per line, with an integer label column.

use std::path::Path;

use crate::error::{decode_maybe_gz, DataError, Result};
use crate::Dataset;

/// How to read a CSV file; see [`load_csv`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CsvOptions {
    /// The label column, counting from 0; `None` (the default) means the last column.
    pub label_column: Option<usize>,
    /// Whether the first line is a header: `None` (the default) detects it (a header is a
    /// first line with a non-numeric field), `Some(true)` always skips it, `Some(false)` never.
    pub header: Option<bool>,
    /// The field separator; `,` by default.
    pub delimiter: char,
    /// The number of classes; `None` (the default) means the largest label plus one.
    pub num_classes: Option<usize>,
}

impl Default for CsvOptions {
    fn default() -> Self {
        CsvOptions {
            label_column: None,
            header: None,
            delimiter: ',',
            num_classes: None,
        }
    }
}

/// Load a numeric CSV file (plain or gzip-compressed, detected by the magic bytes) as a
/// [`Dataset`] with f32 features of per-sample shape `[columns - 1]` and i64 labels.
///
/// Blank lines are skipped; fields are trimmed. Every row must have the same number of fields,
/// every feature must be a finite number and every label a non-negative integer (`3` or `3.0`).
/// Errors name the file, line and column.
pub fn load_csv(path: impl AsRef<Path>, opts: &CsvOptions) -> Result<Dataset> {
    let path = path.as_ref();
    let bytes = std::fs::read(path).map_err(|e| DataError::io(path, e))?;
    csv_from_bytes(bytes, path, opts)
}

/// [`load_csv`] of a file held in memory (plain or gzip-compressed); `path` names it in
/// errors.
///
/// ```
/// use nerve_data::csv::{csv_from_bytes, CsvOptions};
/// let ds = csv_from_bytes(b"x,y,label\n0.5,1,0\n2,3,1\n".to_vec(), "inline.csv", &CsvOptions::default())?;
/// assert_eq!((ds.len(), ds.sample_dims(), ds.num_classes()), (2, &[2][..], 2));
/// # Ok::<(), nerve_data::DataError>(())
/// ```
pub fn csv_from_bytes(
    bytes: Vec<u8>,
    path: impl AsRef<Path>,
    opts: &CsvOptions,
) -> Result<Dataset> {
    let path = path.as_ref();
    let table = parse_csv(decode_maybe_gz(bytes, path)?, path, opts)?;
    let num_classes = match opts.num_classes {
        Some(k) => k,
        None => table.labels.iter().max().map_or(0, |&m| m as usize + 1),
    };
    if let Some((i, &l)) = table
        .labels
        .iter()
        .enumerate()
        .find(|&(_, &l)| l as usize >= num_classes)
    {
        return Err(DataError::parse(
            path,
            table.lines[i],
            table.label_column + 1,
            format!("label {l} is not below num_classes = {num_classes}"),
        ));
    }
    Dataset::new(table.features, vec![table.width], table.labels, num_classes)
}

/// A parsed CSV table: row-major features, labels and the source line of each row.
pub(crate) struct Table {
    pub features: Vec<f32>,
    pub width: usize,
    pub labels: Vec<i64>,
    pub lines: Vec<usize>,
    pub label_column: usize,
}

pub(crate) fn parse_csv(bytes: Vec<u8>, path: &Path, opts: &CsvOptions) -> Result<Table> {
    let text = String::from_utf8(bytes).map_err(|e| {
        let bytes = e.as_bytes();
        let at = e.utf8_error().valid_up_to();
        let line = bytes[..at].iter().filter(|&&b| b == b'\n').count() + 1;
        let start = bytes[..at]
            .iter()
            .rposition(|&b| b == b'\n')
            .map_or(0, |i| i + 1);
        let column = String::from_utf8_lossy(&bytes[start..at])
            .split(opts.delimiter)
            .count();
        DataError::parse(path, line, column, "not valid UTF-8")
    })?;
    let mut rows = text
        .lines()
        .enumerate()
        .map(|(i, l)| (i + 1, l))
        .filter(|(_, l)| !l.trim().is_empty())
        .peekable();
    let Some(&(first_line, first)) = rows.peek() else {
        return Err(DataError::format(path, "no data rows"));
    };
    let ncols = first.split(opts.delimiter).count();
    if ncols < 2 {
        return Err(DataError::parse(
            path,
            first_line,
            1,
            format!("need at least 2 columns (features and a label), found {ncols}"),
        ));
    }
    let label_column = opts.label_column.unwrap_or(ncols - 1);
    if label_column >= ncols {
        return Err(DataError::format(
            path,
            format!("label column {label_column} out of range for {ncols} columns"),
        ));
    }
    let is_header = opts.header.unwrap_or_else(|| {
        first
            .split(opts.delimiter)
            .any(|f| f.trim().parse::<f64>().is_err())
    });
    if is_header {
        rows.next();
    }
    let mut t = Table {
        features: Vec::new(),
        width: ncols - 1,
        labels: Vec::new(),
        lines: Vec::new(),
        label_column,
    };
    for (line, row) in rows {
        let mut n = 0;
        for (col, field) in row.split(opts.delimiter).enumerate() {
            n += 1;
            if col >= ncols {
                continue;
            }
            let field = field.trim();
            let bad = |what: &str| {
                DataError::parse(path, line, col + 1, format!("{what}, found {field:?}"))
            };
            if col == label_column {
                let label = match field.parse::<i64>() {
                    Ok(v) => Some(v),
                    Err(_) => field
                        .parse::<f64>()
                        .ok()
                        .filter(|v| v.fract() == 0.0 && v.abs() < 9.0e15)
                        .map(|v| v as i64),
                };
                match label {
                    Some(v) if v >= 0 => t.labels.push(v),
                    _ => return Err(bad("expected a non-negative integer label")),
                }
            } else {
                match field.parse::<f32>() {
                    Ok(v) if v.is_finite() => t.features.push(v),
                    _ => return Err(bad("expected a finite number")),
                }
            }
        }
        if n != ncols {
            return Err(DataError::parse(
                path,
                line,
                n.min(ncols) + 1,
                format!("expected {ncols} fields (as on line {first_line}), found {n}"),
            ));
        }
        t.lines.push(line);
    }
    if t.labels.is_empty() {
        return Err(DataError::format(path, "no data rows"));
    }
    Ok(t)
}

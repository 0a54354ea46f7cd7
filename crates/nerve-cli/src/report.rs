//! A run's report as Markdown or as a self-contained HTML page: what was trained, how it
//! ended, its curves, its confusion matrix and a sample of what it produces.
//!
//! [`run`] is `nerve report RUN`: it gathers a [`ReportInput`] (config, metrics, plots, and
//! for classifiers a confusion matrix on the test split, for language models a sample, for
//! diffusion the sample grid) and writes `RUN/report.md` or `RUN/report.html`.

use std::fmt::Write as _;
use std::path::{Component, Path, PathBuf};

use anyhow::{Context, Result};
use nerve_nn::checkpoint::{load_safetensors, write_atomic};
use serde_json::Value;

use crate::models::ModelKind;

use crate::plot::Record;

/// Everything a report shows. Paths to plots and the sample image are linked relative to
/// `run_dir` (the folder the report is written into): a path inside `run_dir` is made
/// relative to it, any other path is linked as given.
#[derive(Debug, Clone, Default)]
pub struct ReportInput {
    /// The run folder.
    pub run_dir: PathBuf,
    /// The model's name, e.g. `mlp` or `gpt2-small`.
    pub model: String,
    /// The resolved configuration (`config.json`), shown pretty-printed.
    pub config: Value,
    /// Every metrics record, as [`crate::plot::read_metrics`] returns them; used for the
    /// run summary and the evaluation history.
    pub records: Vec<Record>,
    /// The plot images to show, e.g. from [`crate::plot::write_plots`].
    pub plots: Vec<PathBuf>,
    /// How the run ended.
    pub final_metrics: FinalMetrics,
    /// Classifiers: evaluation counts by true class (rows) and predicted class (columns).
    pub confusion: Option<ConfusionMatrix>,
    /// Language models: a generated text sample.
    pub sample_text: Option<String>,
    /// Diffusion models: a generated image.
    pub sample_image: Option<PathBuf>,
}

/// The records that sum up a run's end.
#[derive(Debug, Clone, Default)]
pub struct FinalMetrics {
    /// The last `"train"` record.
    pub last_train: Option<Record>,
    /// The last `"eval"` record.
    pub last_eval: Option<Record>,
    /// The best value of one evaluation metric over the run.
    pub best_eval: Option<BestMetric>,
    /// The `"test"` record, if the run was tested.
    pub test: Option<Record>,
}

/// The best value an evaluation metric reached, and when.
#[derive(Debug, Clone, PartialEq)]
pub struct BestMetric {
    /// The field name, e.g. `val_accuracy` or `val_loss`.
    pub metric: String,
    /// Its best value.
    pub value: f64,
    /// The step of the record that holds it.
    pub step: i64,
    /// Whether larger is better (accuracy) or smaller (loss).
    pub higher_is_better: bool,
}

/// A confusion matrix: `counts[t][p]` is how many examples of true class `t` were
/// predicted as `p`.
#[derive(Debug, Clone, Default)]
pub struct ConfusionMatrix {
    /// Counts, one row per true class. Ragged rows are read as zero-padded.
    pub counts: Vec<Vec<usize>>,
    /// Class names by index; classes past its end are shown by index.
    pub class_names: Option<Vec<String>>,
}

impl FinalMetrics {
    /// Picks the last train, eval and test records and the best `best_metric` among the
    /// eval records (the earliest step wins a tie). Records are taken in the given order,
    /// as [`crate::plot::read_metrics`] returns them.
    ///
    /// ```ignore
    /// let finals = FinalMetrics::from_records(&records, "val_accuracy", true);
    /// ```
    pub fn from_records(records: &[Record], best_metric: &str, higher_is_better: bool) -> Self {
        let last = |kind: &str| records.iter().rev().find(|r| kind_of(r) == kind).cloned();
        let mut best: Option<BestMetric> = None;
        for record in records.iter().filter(|r| kind_of(r) == "eval") {
            let (Some(value), Some(step)) = (number(record, best_metric), step_of(record)) else {
                continue;
            };
            let better = match &best {
                None => true,
                Some(b) if higher_is_better => value > b.value,
                Some(b) => value < b.value,
            };
            if better {
                best = Some(BestMetric {
                    metric: best_metric.to_string(),
                    value,
                    step,
                    higher_is_better,
                });
            }
        }
        FinalMetrics {
            last_train: last("train"),
            last_eval: last("eval"),
            best_eval: best,
            test: last("test"),
        }
    }
}

impl ConfusionMatrix {
    /// The number of classes: the larger of the row count and the longest row.
    pub fn classes(&self) -> usize {
        let widest = self.counts.iter().map(Vec::len).max().unwrap_or(0);
        widest.max(self.counts.len())
    }

    /// The count for true class `t` predicted as `p`, zero outside the matrix.
    pub fn count(&self, t: usize, p: usize) -> usize {
        self.counts
            .get(t)
            .and_then(|row| row.get(p))
            .copied()
            .unwrap_or(0)
    }

    /// The name of class `i`: its entry in `class_names`, or its index.
    pub fn class_name(&self, i: usize) -> String {
        self.class_names
            .as_ref()
            .and_then(|names| names.get(i))
            .cloned()
            .unwrap_or_else(|| i.to_string())
    }

    /// The fraction of class `t`'s examples predicted correctly (its recall); `None` for a
    /// class with no examples.
    pub fn class_accuracy(&self, t: usize) -> Option<f64> {
        let total: usize = self.counts.get(t).map_or(0, |row| row.iter().sum());
        (total > 0).then(|| self.count(t, t) as f64 / total as f64)
    }

    /// The fraction of all examples on the diagonal; `None` when the matrix is empty.
    pub fn overall_accuracy(&self) -> Option<f64> {
        let total: usize = self.counts.iter().flatten().sum();
        let correct: usize = (0..self.classes()).map(|i| self.count(i, i)).sum();
        (total > 0).then(|| correct as f64 / total as f64)
    }
}

/// Fields every record has that are not metrics.
const BOOKKEEPING: [&str; 4] = ["kind", "step", "epoch", "time_s"];

/// At most this many evaluations are listed (the latest ones).
const MAX_EVAL_ROWS: usize = 25;

fn kind_of(record: &Record) -> &str {
    record.get("kind").and_then(Value::as_str).unwrap_or("")
}

fn step_of(record: &Record) -> Option<i64> {
    let step = record.get("step")?;
    step.as_i64()
        .or_else(|| step.as_f64().filter(|s| s.fract() == 0.0).map(|s| s as i64))
}

fn number(record: &Record, field: &str) -> Option<f64> {
    record.get(field)?.as_f64().filter(|v| v.is_finite())
}

/// A metric value, short: integers as integers, ordinary magnitudes with four decimals,
/// tiny or huge ones (learning rates) in scientific notation.
fn format_number(value: f64) -> String {
    let magnitude = value.abs();
    if !value.is_finite() {
        value.to_string()
    } else if value.fract() == 0.0 && magnitude < 1e15 {
        format!("{}", value as i64)
    } else if (1e-3..1e6).contains(&magnitude) {
        let text = format!("{value:.4}");
        text.trim_end_matches('0').trim_end_matches('.').to_string()
    } else {
        // `3.000e-4` reads better as `3e-4`: trim the mantissa's trailing zeros.
        let text = format!("{value:.3e}");
        match text.split_once('e') {
            Some((mantissa, exponent)) => {
                let mantissa = mantissa.trim_end_matches('0').trim_end_matches('.');
                format!("{mantissa}e{exponent}")
            }
            None => text,
        }
    }
}

/// A JSON value as a table cell: numbers via [`format_number`], strings bare.
fn format_value(value: &Value) -> String {
    match value {
        Value::Number(n) => n.as_f64().map_or_else(|| n.to_string(), format_number),
        Value::String(s) => s.clone(),
        Value::Null => "–".to_string(),
        other => other.to_string(),
    }
}

/// Seconds as `1h 02m 03s`, `2m 03s` or `12.3 s`.
fn format_duration(seconds: f64) -> String {
    if !seconds.is_finite() || seconds < 0.0 {
        return "–".to_string();
    }
    if seconds < 60.0 {
        return format!("{seconds:.1} s");
    }
    let total = seconds.round() as u64;
    let (h, m, s) = (total / 3600, total / 60 % 60, total % 60);
    if h > 0 {
        format!("{h}h {m:02}m {s:02}s")
    } else {
        format!("{m}m {s:02}s")
    }
}

/// A path as a relative URL from `run_dir`: made relative when inside it, `/`-separated,
/// and percent-encoded outside the unreserved characters.
fn link(run_dir: &Path, path: &Path) -> String {
    let relative = path.strip_prefix(run_dir).unwrap_or(path);
    let mut parts: Vec<String> = Vec::new();
    let mut absolute = false;
    for component in relative.components() {
        match component {
            Component::Normal(part) => parts.push(part.to_string_lossy().into_owned()),
            Component::ParentDir => parts.push("..".to_string()),
            Component::RootDir => absolute = true,
            Component::CurDir | Component::Prefix(_) => {}
        }
    }
    let mut url = String::new();
    if absolute {
        url.push('/');
    }
    for (i, part) in parts.iter().enumerate() {
        if i > 0 {
            url.push('/');
        }
        for byte in part.bytes() {
            if byte.is_ascii_alphanumeric() || b"-._~".contains(&byte) {
                url.push(byte as char);
            } else {
                let _ = write!(url, "%{byte:02X}");
            }
        }
    }
    url
}

/// A file name to show under an image: the path's last component.
fn caption(path: &Path) -> String {
    path.file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_else(|| path.display().to_string())
}

/// Escapes text for HTML element content and attribute values.
fn escape_html(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

/// Escapes text for Markdown inline content and table cells.
fn escape_markdown(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '\\' | '`' | '*' | '_' | '[' | ']' | '<' | '>' | '#' | '|' | '!' => {
                out.push('\\');
                out.push(c);
            }
            '\n' | '\r' => out.push(' '),
            c => out.push(c),
        }
    }
    out
}

/// A fenced Markdown code block whose fence is longer than any backtick run inside.
fn markdown_code_block(out: &mut String, language: &str, text: &str) {
    let longest = text.split(|c| c != '`').map(str::len).max().unwrap_or(0);
    let fence = "`".repeat(longest.max(2) + 1);
    let _ = writeln!(
        out,
        "{fence}{language}\n{}\n{fence}\n",
        text.trim_end_matches('\n')
    );
}

/// One row of the summary and final-metrics tables.
struct Row {
    name: String,
    value: String,
    step: String,
}

/// Steps, epochs, wall time and evaluation count from the records.
fn summary_rows(input: &ReportInput) -> Vec<Row> {
    let records = &input.records;
    let max_of = |kind: Option<&str>, field: &str| {
        records
            .iter()
            .filter(|r| kind.is_none_or(|k| kind_of(r) == k))
            .filter_map(|r| number(r, field))
            .fold(None, |acc: Option<f64>, v| {
                Some(acc.map_or(v, |a| a.max(v)))
            })
    };
    let row = |name: &str, value: String| Row {
        name: name.to_string(),
        value,
        step: String::new(),
    };
    let mut rows = vec![row("model", input.model.clone())];
    if let Some(steps) = max_of(Some("train"), "step") {
        rows.push(row("optimizer steps", format_number(steps)));
    }
    if let Some(epochs) = max_of(Some("train"), "epoch") {
        rows.push(row("epochs", format_number(epochs)));
    }
    if let Some(seconds) = max_of(None, "time_s") {
        rows.push(row("training time", format_duration(seconds)));
    }
    let evals = records.iter().filter(|r| kind_of(r) == "eval").count();
    if evals > 0 {
        rows.push(row("evaluations", evals.to_string()));
    }
    rows
}

/// The metrics of the last train, last eval and test records, then the best eval value.
fn final_rows(finals: &FinalMetrics) -> Vec<Row> {
    let mut rows = Vec::new();
    let sources = [
        ("last train", &finals.last_train),
        ("last eval", &finals.last_eval),
        ("test", &finals.test),
    ];
    for (source, record) in sources {
        let Some(record) = record else { continue };
        let step = step_of(record).map(|s| s.to_string()).unwrap_or_default();
        for (field, value) in record {
            if BOOKKEEPING.contains(&field.as_str()) || value.is_null() {
                continue;
            }
            rows.push(Row {
                name: format!("{field} ({source})"),
                value: format_value(value),
                step: step.clone(),
            });
        }
    }
    if let Some(best) = &finals.best_eval {
        let direction = if best.higher_is_better { "max" } else { "min" };
        rows.push(Row {
            name: format!("best {} ({direction})", best.metric),
            value: format_number(best.value),
            step: best.step.to_string(),
        });
    }
    rows
}

/// The evaluation history: its metric columns and the latest [`MAX_EVAL_ROWS`] records.
fn eval_history(records: &[Record]) -> (Vec<String>, Vec<&Record>, usize) {
    let evals: Vec<&Record> = records.iter().filter(|r| kind_of(r) == "eval").collect();
    let mut columns: Vec<String> = Vec::new();
    for record in &evals {
        for (field, value) in record.iter() {
            if !BOOKKEEPING.contains(&field.as_str())
                && !value.is_null()
                && !columns.contains(field)
            {
                columns.push(field.clone());
            }
        }
    }
    let total = evals.len();
    let shown = evals[total.saturating_sub(MAX_EVAL_ROWS)..].to_vec();
    (columns, shown, total)
}

fn cell(record: &Record, field: &str) -> String {
    record
        .get(field)
        .map_or_else(|| "–".to_string(), format_value)
}

/// The report as Markdown (CommonMark with GitHub tables).
pub fn render_markdown(input: &ReportInput) -> String {
    let md = escape_markdown;
    let mut out = String::new();
    let _ = writeln!(out, "# Run report: {}\n", md(&input.model));
    let _ = writeln!(
        out,
        "Run folder: `{}`\n",
        input.run_dir.display().to_string().replace('`', "'")
    );

    out.push_str("## Summary\n\n| | |\n|---|---|\n");
    for row in summary_rows(input) {
        let _ = writeln!(out, "| {} | {} |", md(&row.name), md(&row.value));
    }
    out.push('\n');

    let finals = final_rows(&input.final_metrics);
    if !finals.is_empty() {
        out.push_str("## Final metrics\n\n| metric | value | step |\n|---|---:|---:|\n");
        for row in finals {
            let _ = writeln!(
                out,
                "| {} | {} | {} |",
                md(&row.name),
                md(&row.value),
                row.step
            );
        }
        out.push('\n');
    }

    if !input.plots.is_empty() {
        out.push_str("## Curves\n\n");
        for plot in &input.plots {
            let _ = writeln!(
                out,
                "![{}]({})\n",
                md(&caption(plot)),
                link(&input.run_dir, plot)
            );
        }
    }

    let (columns, shown, total) = eval_history(&input.records);
    if total > 0 {
        out.push_str("## Evaluations\n\n");
        if shown.len() < total {
            let _ = writeln!(out, "The last {} of {total}.\n", shown.len());
        }
        out.push_str("| step |");
        for column in &columns {
            let _ = write!(out, " {} |", md(column));
        }
        out.push_str("\n|---:|");
        out.push_str(&"---:|".repeat(columns.len()));
        out.push('\n');
        for record in shown {
            let step = step_of(record).map(|s| s.to_string()).unwrap_or_default();
            let _ = write!(out, "| {step} |");
            for column in &columns {
                let _ = write!(out, " {} |", md(&cell(record, column)));
            }
            out.push('\n');
        }
        out.push('\n');
    }

    if let Some(matrix) = &input.confusion {
        markdown_confusion(&mut out, matrix);
    }

    if let Some(text) = &input.sample_text {
        out.push_str("## Sample\n\n");
        markdown_code_block(&mut out, "text", text);
    }
    if let Some(image) = &input.sample_image {
        let _ = writeln!(
            out,
            "## Sample image\n\n![sample]({})\n",
            link(&input.run_dir, image)
        );
    }

    out.push_str("## Configuration\n\n");
    let config = serde_json::to_string_pretty(&input.config).unwrap_or_default();
    markdown_code_block(&mut out, "json", &config);
    out
}

fn markdown_confusion(out: &mut String, matrix: &ConfusionMatrix) {
    let n = matrix.classes();
    if n == 0 {
        return;
    }
    out.push_str("## Confusion matrix\n\nRows: true class; columns: predicted class.\n\n");
    out.push_str("| true \\\\ predicted |");
    for p in 0..n {
        let _ = write!(out, " {} |", escape_markdown(&matrix.class_name(p)));
    }
    out.push_str(" accuracy |\n|---|");
    out.push_str(&"---:|".repeat(n + 1));
    out.push('\n');
    for t in 0..n {
        let _ = write!(out, "| **{}** |", escape_markdown(&matrix.class_name(t)));
        for p in 0..n {
            let _ = write!(out, " {} |", matrix.count(t, p));
        }
        let accuracy = matrix
            .class_accuracy(t)
            .map_or_else(|| "–".to_string(), |a| format!("{:.1}%", 100.0 * a));
        let _ = writeln!(out, " {accuracy} |");
    }
    if let Some(overall) = matrix.overall_accuracy() {
        let _ = writeln!(out, "\nOverall accuracy: {:.2}%", 100.0 * overall);
    }
    out.push('\n');
}

/// The page's style: readable tables without any external file.
const STYLE: &str = "body{font-family:system-ui,-apple-system,'Segoe UI',sans-serif;max-width:960px;\
margin:2em auto;padding:0 1em;color:#222;line-height:1.45}\
h1{font-size:1.6em}h2{font-size:1.25em;margin-top:1.8em;border-bottom:1px solid #ddd;padding-bottom:.2em}\
table{border-collapse:collapse;margin:.6em 0;font-size:.92em}\
th,td{border:1px solid #d0d7de;padding:.3em .7em}th{background:#f3f5f7;text-align:left}\
td.num{text-align:right;font-variant-numeric:tabular-nums}tr:nth-child(even) td{background:#fafbfc}\
td.cm{text-align:right;min-width:2.5em}\
img{max-width:100%;height:auto;display:block;margin:.6em 0;border:1px solid #eee}\
pre{background:#f6f8fa;padding:.8em;overflow-x:auto;border-radius:4px;font-size:.88em}\
code{font-family:ui-monospace,Menlo,Consolas,monospace}p.note{color:#666;font-size:.9em}";

/// The report as one self-contained HTML page: inline style, no scripts, every text
/// escaped, images linked by relative path.
pub fn render_html(input: &ReportInput) -> String {
    let h = escape_html;
    let mut out = String::new();
    let _ = write!(
        out,
        "<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n\
         <meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\n\
         <title>Run report: {}</title>\n<style>{STYLE}</style>\n</head>\n<body>\n",
        h(&input.model)
    );
    let _ = writeln!(out, "<h1>Run report: {}</h1>", h(&input.model));
    let _ = writeln!(
        out,
        "<p>Run folder: <code>{}</code></p>",
        h(&input.run_dir.display().to_string())
    );

    out.push_str("<h2>Summary</h2>\n<table>\n");
    for row in summary_rows(input) {
        let _ = writeln!(
            out,
            "<tr><th>{}</th><td>{}</td></tr>",
            h(&row.name),
            h(&row.value)
        );
    }
    out.push_str("</table>\n");

    let finals = final_rows(&input.final_metrics);
    if !finals.is_empty() {
        out.push_str(
            "<h2>Final metrics</h2>\n<table>\n<tr><th>metric</th><th>value</th><th>step</th></tr>\n",
        );
        for row in finals {
            let _ = writeln!(
                out,
                "<tr><td>{}</td><td class=\"num\">{}</td><td class=\"num\">{}</td></tr>",
                h(&row.name),
                h(&row.value),
                h(&row.step)
            );
        }
        out.push_str("</table>\n");
    }

    if !input.plots.is_empty() {
        out.push_str("<h2>Curves</h2>\n");
        for plot in &input.plots {
            let _ = writeln!(
                out,
                "<img src=\"{}\" alt=\"{}\">",
                h(&link(&input.run_dir, plot)),
                h(&caption(plot))
            );
        }
    }

    let (columns, shown, total) = eval_history(&input.records);
    if total > 0 {
        out.push_str("<h2>Evaluations</h2>\n");
        if shown.len() < total {
            let _ = writeln!(
                out,
                "<p class=\"note\">The last {} of {total}.</p>",
                shown.len()
            );
        }
        out.push_str("<table>\n<tr><th>step</th>");
        for column in &columns {
            let _ = write!(out, "<th>{}</th>", h(column));
        }
        out.push_str("</tr>\n");
        for record in shown {
            let step = step_of(record).map(|s| s.to_string()).unwrap_or_default();
            let _ = write!(out, "<tr><td class=\"num\">{step}</td>");
            for column in &columns {
                let _ = write!(out, "<td class=\"num\">{}</td>", h(&cell(record, column)));
            }
            out.push_str("</tr>\n");
        }
        out.push_str("</table>\n");
    }

    if let Some(matrix) = &input.confusion {
        html_confusion(&mut out, matrix);
    }

    if let Some(text) = &input.sample_text {
        let _ = writeln!(out, "<h2>Sample</h2>\n<pre>{}</pre>", h(text));
    }
    if let Some(image) = &input.sample_image {
        let _ = writeln!(
            out,
            "<h2>Sample image</h2>\n<img src=\"{}\" alt=\"generated sample\">",
            h(&link(&input.run_dir, image))
        );
    }

    let config = serde_json::to_string_pretty(&input.config).unwrap_or_default();
    let _ = writeln!(
        out,
        "<h2>Configuration</h2>\n<pre><code>{}</code></pre>",
        h(&config)
    );
    out.push_str("</body>\n</html>\n");
    out
}

fn html_confusion(out: &mut String, matrix: &ConfusionMatrix) {
    let n = matrix.classes();
    if n == 0 {
        return;
    }
    out.push_str(
        "<h2>Confusion matrix</h2>\n<p class=\"note\">Rows: true class; columns: predicted \
         class; shading: share of the row.</p>\n<table>\n<tr><th>true \\ predicted</th>",
    );
    for p in 0..n {
        let _ = write!(out, "<th>{}</th>", escape_html(&matrix.class_name(p)));
    }
    out.push_str("<th>accuracy</th></tr>\n");
    for t in 0..n {
        let _ = write!(out, "<tr><th>{}</th>", escape_html(&matrix.class_name(t)));
        let row_total: usize = (0..n).map(|p| matrix.count(t, p)).sum();
        for p in 0..n {
            let count = matrix.count(t, p);
            let share = if row_total > 0 {
                count as f64 / row_total as f64
            } else {
                0.0
            };
            let (r, g, b) = if t == p { (44, 160, 44) } else { (214, 39, 40) };
            let _ = write!(
                out,
                "<td class=\"cm\" style=\"background:rgba({r},{g},{b},{:.2})\">{count}</td>",
                0.6 * share
            );
        }
        let accuracy = matrix
            .class_accuracy(t)
            .map_or_else(|| "–".to_string(), |a| format!("{:.1}%", 100.0 * a));
        let _ = writeln!(out, "<td class=\"num\">{accuracy}</td></tr>");
    }
    out.push_str("</table>\n");
    if let Some(overall) = matrix.overall_accuracy() {
        let _ = writeln!(out, "<p>Overall accuracy: {:.2}%</p>", 100.0 * overall);
    }
}

/// Arguments of `nerve report`.
#[derive(clap::Args)]
pub struct ReportArgs {
    /// A run folder written by `nerve train`.
    run: PathBuf,
    /// Markdown (`report.md`) or a self-contained HTML page (`report.html`).
    #[arg(long, value_enum, default_value_t = Format::Md)]
    format: Format,
    /// Where to write it (default: in the run folder).
    #[arg(long)]
    out: Option<PathBuf>,
    /// Folder of the fetched data set, for a classifier's confusion matrix.
    #[arg(long)]
    data_dir: Option<PathBuf>,
}

/// The report's format.
#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum Format {
    /// Markdown.
    Md,
    /// HTML.
    Html,
}

/// `nerve report RUN`: the run's config, final and best metrics, plots (drawn afresh from
/// metrics.jsonl), a confusion matrix on the test split (classifiers, from the best
/// checkpoint), and sample output (language models, diffusion).
pub fn run(a: &ReportArgs) -> Result<()> {
    let dir = &a.run;
    let cfg_file = dir.join("config.json");
    let text = std::fs::read_to_string(&cfg_file).with_context(|| {
        format!(
            "{}: reading {} (is it a run folder of `nerve train`?)",
            dir.display(),
            cfg_file.display()
        )
    })?;
    let config: Value = serde_json::from_str(&text)
        .with_context(|| format!("{}: not valid JSON", cfg_file.display()))?;
    let records = crate::plot::read_metrics(&dir.join("metrics.jsonl"))?;
    let plots = crate::plot::write_plots(dir, &records)?;
    let command: Vec<String> = config
        .get("command")
        .and_then(|c| serde_json::from_value(c.clone()).ok())
        .unwrap_or_default();
    let monitor = command
        .iter()
        .position(|c| c == "--monitor")
        .and_then(|i| command.get(i + 1).cloned())
        .unwrap_or_else(|| "val_loss".to_string());
    let final_metrics =
        FinalMetrics::from_records(&records, &monitor, monitor.contains("accuracy"));
    let mut input = ReportInput {
        run_dir: dir.clone(),
        config,
        records,
        plots,
        final_metrics,
        ..Default::default()
    };
    let run_model = input
        .config
        .get("model")
        .and_then(serde_json::Value::as_str)
        .unwrap_or_default()
        .to_string();
    if run_model.starts_with("finetune") {
        // `nerve finetune` (adapters over a pretrained model): metrics and plots.
        input.model = run_model;
    } else {
        add_model_section(&mut input, a, dir)?;
    }
    let (body, name) = match a.format {
        Format::Md => (render_markdown(&input), "report.md"),
        Format::Html => (render_html(&input), "report.html"),
    };
    let out = a.out.clone().unwrap_or_else(|| dir.join(name));
    write_atomic(&out, body.as_bytes())?;
    println!("{}", out.display());
    Ok(())
}

/// The model's part of the report: a confusion matrix on the test split (classifiers, from
/// the best weights if any, else the latest) or the samples (generative models).
fn add_model_section(input: &mut ReportInput, a: &ReportArgs, dir: &Path) -> Result<()> {
    // The best weights if there are any, else the latest.
    let file = [dir.join("best.safetensors"), dir.join("model.safetensors")]
        .into_iter()
        .find(|f| f.is_file())
        .with_context(|| format!("{}: no model.safetensors", dir.display()))?;
    let (_, meta) = load_safetensors(&file)?;
    let kind = crate::checkpoint_kind(&meta, &file)?;
    input.model = kind.name().to_string();
    if kind == ModelKind::Ddpm {
        input.sample_image = Some(dir.join("samples.png")).filter(|p| p.is_file());
    } else if kind.is_lm() {
        input.sample_text = match std::fs::read_to_string(dir.join("samples.txt")) {
            Ok(t) => Some(t),
            Err(_) => Some(crate::lm::sample_from(&file, &meta, 300)?),
        };
    } else {
        let (s, spec, split) = crate::score_classifier(
            &file,
            &meta,
            kind,
            None,
            a.data_dir.as_deref(),
            crate::Split::Test,
            500,
        )?;
        eprintln!(
            "confusion matrix of {} on {spec} ({split} split, {} samples)",
            file.display(),
            s.n
        );
        input.confusion = Some(ConfusionMatrix {
            counts: s.confusion,
            class_names: None,
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(json: &str) -> Record {
        match serde_json::from_str(json).unwrap() {
            Value::Object(map) => map,
            other => panic!("not an object: {other}"),
        }
    }

    fn classifier_input() -> ReportInput {
        let records = vec![
            record(
                r#"{"kind":"train","step":100,"epoch":0.5,"time_s":10.0,"loss":0.9,"lr":0.001,"accuracy":0.7}"#,
            ),
            record(
                r#"{"kind":"eval","step":100,"epoch":0.5,"time_s":11.0,"val_loss":0.8,"val_accuracy":0.75}"#,
            ),
            record(
                r#"{"kind":"train","step":200,"epoch":1.0,"time_s":125.0,"loss":0.4,"lr":0.0003,"accuracy":0.88}"#,
            ),
            record(
                r#"{"kind":"eval","step":200,"epoch":1.0,"time_s":126.0,"val_loss":0.5,"val_accuracy":0.86}"#,
            ),
            record(
                r#"{"kind":"test","step":200,"time_s":130.0,"test_loss":0.45,"test_accuracy":0.8765}"#,
            ),
        ];
        let final_metrics = FinalMetrics::from_records(&records, "val_accuracy", true);
        ReportInput {
            run_dir: PathBuf::from("runs/mnist mlp"),
            model: "mlp".to_string(),
            config: serde_json::json!({"model": "mlp", "lr": 0.001, "batch_size": 64}),
            records,
            plots: vec![
                PathBuf::from("runs/mnist mlp/loss.png"),
                PathBuf::from("accuracy.png"),
            ],
            final_metrics,
            confusion: Some(ConfusionMatrix {
                counts: vec![vec![8, 2], vec![1, 9]],
                class_names: Some(vec!["cat".into(), "dog".into()]),
            }),
            sample_text: None,
            sample_image: None,
        }
    }

    #[test]
    fn final_metrics_picks_last_records_and_best_eval() {
        let input = classifier_input();
        let finals = &input.final_metrics;
        assert_eq!(finals.last_train.as_ref().unwrap()["step"], 200);
        assert_eq!(finals.last_eval.as_ref().unwrap()["val_loss"], 0.5);
        assert_eq!(finals.test.as_ref().unwrap()["test_accuracy"], 0.8765);
        let best = finals.best_eval.as_ref().unwrap();
        assert_eq!((best.value, best.step), (0.86, 200));
        let lowest = FinalMetrics::from_records(&input.records, "val_loss", false);
        assert_eq!(lowest.best_eval.unwrap().value, 0.5);
    }

    #[test]
    fn markdown_shows_the_key_content() {
        let md = render_markdown(&classifier_input());
        for expected in [
            "# Run report: mlp",
            "| optimizer steps | 200 |",
            "| training time | 2m 10s |",
            "| test\\_accuracy (test) | 0.8765 | 200 |",
            "| best val\\_accuracy (max) | 0.86 | 200 |",
            "![loss](loss.png)",
            "![accuracy](accuracy.png)",
            "| **cat** | 8 | 2 | 80.0% |",
            "| **dog** | 1 | 9 | 90.0% |",
            "Overall accuracy: 85.00%",
            "\"batch_size\": 64",
        ] {
            assert!(md.contains(expected), "missing {expected:?} in\n{md}");
        }
    }

    #[test]
    fn html_shows_the_key_content() {
        let html = render_html(&classifier_input());
        assert!(html.starts_with("<!DOCTYPE html>"));
        assert!(html.trim_end().ends_with("</html>"));
        for expected in [
            "<h1>Run report: mlp</h1>",
            "<img src=\"loss.png\" alt=\"loss\">",
            "<img src=\"accuracy.png\"",
            "<th>cat</th>",
            "<td class=\"num\">80.0%</td>",
            "<td class=\"num\">90.0%</td>",
            "Overall accuracy: 85.00%",
            "best val_accuracy (max)",
            "&quot;batch_size&quot;: 64",
            "<style>",
        ] {
            assert!(html.contains(expected), "missing {expected:?} in\n{html}");
        }
        // Self-contained: nothing fetched from elsewhere, no scripts.
        assert!(!html.contains("http://") && !html.contains("https://"));
        assert!(!html.to_lowercase().contains("<script"));
    }

    #[test]
    fn html_escapes_every_text() {
        let mut input = classifier_input();
        input.model = "m<b>&\"x\"".to_string();
        input.sample_text = Some("hello <script>alert('x')</script> & bye".to_string());
        input.config = serde_json::json!({"note": "</pre><script>"});
        input.confusion = Some(ConfusionMatrix {
            counts: vec![vec![1]],
            class_names: Some(vec!["<img onerror=x>".into()]),
        });
        let html = render_html(&input);
        assert!(!html.contains("<script"), "{html}");
        assert!(
            !html.contains("<b>") && !html.contains("<img onerror"),
            "{html}"
        );
        assert!(html.contains("hello &lt;script&gt;alert(&#39;x&#39;)&lt;/script&gt; &amp; bye"));
        assert!(html.contains("Run report: m&lt;b&gt;&amp;&quot;x&quot;"));
    }

    #[test]
    fn markdown_keeps_sample_text_verbatim_in_a_safe_fence() {
        let mut input = classifier_input();
        input.sample_text = Some("To be ```or``` not <script>".to_string());
        input.sample_image = Some(PathBuf::from("runs/mnist mlp/samples/step 10.png"));
        let md = render_markdown(&input);
        assert!(
            md.contains("````text\nTo be ```or``` not <script>\n````"),
            "{md}"
        );
        assert!(md.contains("![sample](samples/step%2010.png)"), "{md}");
    }

    #[test]
    fn ragged_or_empty_confusion_matrices_do_not_panic() {
        let ragged = ConfusionMatrix {
            counts: vec![vec![3], vec![0, 0, 2]],
            class_names: Some(vec!["a".into()]),
        };
        assert_eq!(ragged.classes(), 3);
        assert_eq!(ragged.class_accuracy(0), Some(1.0));
        assert_eq!(ragged.class_accuracy(1), Some(0.0));
        assert_eq!(ragged.class_accuracy(2), None);
        assert_eq!(ragged.class_name(2), "2");
        let mut input = ReportInput {
            confusion: Some(ragged),
            ..ReportInput::default()
        };
        assert!(render_html(&input).contains("<th>a</th>"));
        input.confusion = Some(ConfusionMatrix::default());
        let md = render_markdown(&input);
        assert!(!md.contains("Confusion matrix"));
    }

    /// Writes `report.md` and `report.html` of a classifier run into `NERVE_PLOT_DEMO_DIR`
    /// for a person to look at; does nothing when the variable is unset.
    #[test]
    fn demo_report_for_inspection() {
        if let Some(dir) = std::env::var_os("NERVE_PLOT_DEMO_DIR") {
            let dir = PathBuf::from(dir);
            let mut input = classifier_input();
            input.run_dir = dir.clone();
            input.plots = ["loss.png", "accuracy.png", "lr.png"]
                .iter()
                .map(|name| dir.join(name))
                .collect();
            input.sample_text = Some("ROMEO: <what> light through yonder window breaks?".into());
            std::fs::write(dir.join("report.md"), render_markdown(&input)).unwrap();
            std::fs::write(dir.join("report.html"), render_html(&input)).unwrap();
        }
    }

    #[test]
    fn numbers_and_durations_read_well() {
        assert_eq!(format_number(3.0), "3");
        assert_eq!(format_number(0.123456), "0.1235");
        assert_eq!(format_number(0.0003), "3e-4");
        assert_eq!(format_number(2.5e-5), "2.5e-5");
        assert_eq!(format_duration(12.34), "12.3 s");
        assert_eq!(format_duration(3723.0), "1h 02m 03s");
    }
}

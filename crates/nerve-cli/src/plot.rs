//! Training curves of a run: reading its `metrics.jsonl` and drawing `loss.png`,
//! `accuracy.png` and `lr.png` next to it.
//!
//! Text is drawn with Noto Sans Regular, whose bytes are compiled in from the `notosans` crate
//! and rasterised by `ab_glyph`: no system font, fontconfig or file outside the binary is
//! needed, so plots render the same on a bare CI machine as on a desktop.

use std::collections::HashMap;
use std::io::Cursor;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use anyhow::{anyhow, bail, Context, Result};
use image::ImageEncoder;
use nerve_nn::checkpoint::write_atomic;
use plotters::prelude::*;
use plotters::style::FontStyle;
use serde_json::Value;

/// One line of `metrics.jsonl`: a JSON object with `kind`, `step`, `time_s` and the metrics.
pub type Record = serde_json::Map<String, Value>;

/// Width of every plot, in pixels.
pub const PLOT_WIDTH: u32 = 800;
/// Height of every plot, in pixels.
pub const PLOT_HEIGHT: u32 = 500;

/// Reads a run's `metrics.jsonl`: one JSON object per line, in file order.
///
/// Blank lines are ignored. The last non-blank line is skipped if it does not parse, since a
/// process killed mid-write leaves it truncated; an unparsable line anywhere else, or a line
/// that is valid JSON but not an object, is an error naming the file and the line number.
///
/// A resumed run re-logs the steps after its checkpoint, so when a `(kind, step)` pair
/// appears again the later record replaces the earlier one, keeping the earlier one's
/// position (steps stay in order within a kind). Records without an integer `step` are kept
/// as they are.
pub fn read_metrics(path: &Path) -> Result<Vec<Record>> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("reading metrics file {}", path.display()))?;
    parse_metrics(&text).with_context(|| format!("parsing metrics file {}", path.display()))
}

/// [`read_metrics`] on text already read; errors name the line (1-based).
fn parse_metrics(text: &str) -> Result<Vec<Record>> {
    let lines: Vec<(usize, &str)> = text
        .lines()
        .enumerate()
        .map(|(i, line)| (i + 1, line.trim()))
        .filter(|(_, line)| !line.is_empty())
        .collect();
    let mut records: Vec<Record> = Vec::with_capacity(lines.len());
    let mut seen: HashMap<(String, i64), usize> = HashMap::new();
    for (pos, &(number, line)) in lines.iter().enumerate() {
        let value: Value = match serde_json::from_str(line) {
            Ok(value) => value,
            // A write cut short by a kill: the record is lost, the rest is good.
            Err(_) if pos + 1 == lines.len() => break,
            Err(e) => bail!("line {number}: not valid JSON: {e}"),
        };
        let Value::Object(record) = value else {
            bail!("line {number}: expected a JSON object, found {value}");
        };
        let Some(step) = record_step(&record) else {
            records.push(record);
            continue;
        };
        let key = (record_kind(&record).to_string(), step);
        if let Some(&index) = seen.get(&key) {
            records[index] = record;
        } else {
            seen.insert(key, records.len());
            records.push(record);
        }
    }
    Ok(records)
}

/// The record's `kind` (`"train"`, `"eval"`, `"test"`), or `""` when absent.
fn record_kind(record: &Record) -> &str {
    record.get("kind").and_then(Value::as_str).unwrap_or("")
}

/// The record's `step` when it is an integer (`12` or `12.0`).
fn record_step(record: &Record) -> Option<i64> {
    let step = record.get("step")?;
    step.as_i64().or_else(|| {
        step.as_f64()
            .filter(|s| s.is_finite() && s.fract() == 0.0 && s.abs() < 9.0e15)
            .map(|s| s as i64)
    })
}

/// `(step, value)` for every record of `kind` whose `field` is a finite number, by step.
fn series_points(records: &[Record], kind: &str, field: &str) -> Vec<(i64, f64)> {
    let mut points: Vec<(i64, f64)> = records
        .iter()
        .filter(|r| record_kind(r) == kind)
        .filter_map(|r| {
            let value = r.get(field)?.as_f64().filter(|v| v.is_finite())?;
            Some((record_step(r)?, value))
        })
        .collect();
    points.sort_by_key(|&(step, _)| step);
    points
}

/// One line of a plot: its legend label, points and colour.
struct Series {
    label: &'static str,
    points: Vec<(i64, f64)>,
    color: RGBColor,
}

/// What one PNG shows.
struct PlotSpec {
    file_name: &'static str,
    title: &'static str,
    y_label: &'static str,
    series: Vec<Series>,
}

const TRAIN_COLOR: RGBColor = RGBColor(31, 119, 180);
const EVAL_COLOR: RGBColor = RGBColor(214, 39, 40);
const LR_COLOR: RGBColor = RGBColor(44, 160, 44);

/// Writes the run's curves as PNGs ([`PLOT_WIDTH`]×[`PLOT_HEIGHT`]) into `dir`, creating it
/// if needed, and returns the paths written:
///
/// - `loss.png`: train `loss` and eval `val_loss` against step;
/// - `accuracy.png`: train `accuracy` and eval `val_accuracy` against step;
/// - `lr.png`: the learning rate `lr` against step.
///
/// A plot is written only when it has at least one finite point, so a run without accuracy
/// gets no `accuracy.png`, and an empty record list writes nothing and returns an empty
/// list (callers decide whether that is worth a warning). Missing, null, NaN and infinite
/// values are skipped, as are records without an integer `step`. Each file is rendered in
/// memory and written atomically (a temporary file in `dir`, then a rename), so a reader
/// never sees half a PNG.
pub fn write_plots(dir: &Path, records: &[Record]) -> Result<Vec<PathBuf>> {
    let specs = [
        PlotSpec {
            file_name: "loss.png",
            title: "Loss",
            y_label: "loss",
            series: vec![
                Series {
                    label: "train loss",
                    points: series_points(records, "train", "loss"),
                    color: TRAIN_COLOR,
                },
                Series {
                    label: "val loss",
                    points: series_points(records, "eval", "val_loss"),
                    color: EVAL_COLOR,
                },
            ],
        },
        PlotSpec {
            file_name: "accuracy.png",
            title: "Accuracy",
            y_label: "accuracy",
            series: vec![
                Series {
                    label: "train accuracy",
                    points: series_points(records, "train", "accuracy"),
                    color: TRAIN_COLOR,
                },
                Series {
                    label: "val accuracy",
                    points: series_points(records, "eval", "val_accuracy"),
                    color: EVAL_COLOR,
                },
            ],
        },
        PlotSpec {
            file_name: "lr.png",
            title: "Learning rate",
            y_label: "learning rate",
            series: vec![Series {
                label: "learning rate",
                points: series_points(records, "train", "lr"),
                color: LR_COLOR,
            }],
        },
    ];
    let mut written = Vec::new();
    for spec in &specs {
        if spec.series.iter().all(|s| s.points.is_empty()) {
            continue;
        }
        let path = dir.join(spec.file_name);
        let png = render_png(spec).with_context(|| format!("drawing {}", path.display()))?;
        write_atomic(&path, &png).with_context(|| format!("writing {}", path.display()))?;
        written.push(path);
    }
    Ok(written)
}

/// The family name under which the embedded font is registered. Plotters' default text
/// style asks for `sans-serif`, so registering under that name covers every label.
const FONT_FAMILY: &str = "sans-serif";

/// Registers the embedded Noto Sans with plotters, once per process.
fn ensure_font() -> Result<()> {
    static REGISTERED: OnceLock<bool> = OnceLock::new();
    let ok = *REGISTERED.get_or_init(|| {
        plotters::style::register_font(FONT_FAMILY, FontStyle::Normal, notosans::REGULAR_TTF)
            .is_ok()
    });
    if ok {
        Ok(())
    } else {
        bail!("the embedded Noto Sans font could not be loaded")
    }
}

/// Axis bounds covering `values` with a margin, never empty (one value or equal values get
/// a span around them).
fn padded_range(min: f64, max: f64) -> (f64, f64) {
    let span = max - min;
    if span > 0.0 && span.is_finite() {
        (min - 0.05 * span, max + 0.05 * span)
    } else {
        let pad = (min.abs() * 0.1).max(1e-6);
        (min - pad, max + pad)
    }
}

/// A tick label short enough for the axis: plain decimals for ordinary magnitudes,
/// scientific notation for learning rates and other tiny or huge values.
fn tick_label(value: f64) -> String {
    let magnitude = value.abs();
    if magnitude < 1e-12 {
        "0".to_string()
    } else if (1e-2..1e5).contains(&magnitude) {
        let text = format!("{value:.4}");
        let text = text.trim_end_matches('0').trim_end_matches('.');
        text.to_string()
    } else {
        format!("{value:.1e}")
    }
}

/// Puts the legend in the right-hand corner the curves leave free: falling curves (loss)
/// end low, so the upper corner; rising ones (accuracy) end high, so the lower corner.
fn legend_position(series: &[Series], (y_low, y_high): (f64, f64)) -> SeriesLabelPosition {
    let x_max = series
        .iter()
        .filter_map(|s| s.points.last())
        .map(|&(x, _)| x)
        .max();
    let x_min = series
        .iter()
        .filter_map(|s| s.points.first())
        .map(|&(x, _)| x)
        .min();
    let (Some(x_min), Some(x_max)) = (x_min, x_max) else {
        return SeriesLabelPosition::UpperRight;
    };
    // The right third of the plot, where the legend goes.
    let right = x_max - (x_max - x_min) / 3;
    let (mut upper, mut lower) = (0usize, 0usize);
    let middle = 0.5 * (y_low + y_high);
    for &(_, y) in series
        .iter()
        .flat_map(|s| &s.points)
        .filter(|(x, _)| *x >= right)
    {
        if y > middle {
            upper += 1;
        } else {
            lower += 1;
        }
    }
    if upper > lower {
        SeriesLabelPosition::LowerRight
    } else {
        SeriesLabelPosition::UpperRight
    }
}

/// Draws one plot into an RGB buffer and encodes it as PNG bytes.
fn render_png(spec: &PlotSpec) -> Result<Vec<u8>> {
    ensure_font()?;
    let (width, height) = (PLOT_WIDTH, PLOT_HEIGHT);
    let mut rgb = vec![0u8; width as usize * height as usize * 3];
    {
        let root = BitMapBackend::with_buffer(&mut rgb, (width, height)).into_drawing_area();
        root.fill(&WHITE)?;
        let points = spec.series.iter().flat_map(|s| s.points.iter());
        let (mut x_min, mut x_max) = (i64::MAX, i64::MIN);
        let (mut y_min, mut y_max) = (f64::INFINITY, f64::NEG_INFINITY);
        for &(x, y) in points {
            x_min = x_min.min(x);
            x_max = x_max.max(x);
            y_min = y_min.min(y);
            y_max = y_max.max(y);
        }
        if x_min > x_max {
            bail!("nothing to plot");
        }
        // A little room at both ends keeps the first and last markers whole; a single step
        // gets a span around it rather than an empty range.
        let x_pad = (x_max.saturating_sub(x_min) / 50).max(1);
        (x_min, x_max) = (x_min.saturating_sub(x_pad), x_max.saturating_add(x_pad));
        let (y_low, y_high) = padded_range(y_min, y_max);

        let mut chart = ChartBuilder::on(&root)
            .caption(spec.title, (FONT_FAMILY, 24))
            .margin(16)
            .x_label_area_size(48)
            .y_label_area_size(72)
            .build_cartesian_2d(x_min..x_max, y_low..y_high)?;
        chart
            .configure_mesh()
            .x_desc("step")
            .y_desc(spec.y_label)
            .label_style((FONT_FAMILY, 14))
            .axis_desc_style((FONT_FAMILY, 16))
            .y_label_formatter(&|v| tick_label(*v))
            .light_line_style(RGBColor(235, 235, 235))
            .draw()?;

        for series in spec.series.iter().filter(|s| !s.points.is_empty()) {
            let color = series.color;
            let style = color.stroke_width(2);
            chart
                .draw_series(LineSeries::new(series.points.iter().copied(), style))?
                .label(series.label)
                .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], style));
            // Sparse series (evaluations, short runs, a single point) need markers to show.
            if series.points.len() <= 40 {
                chart.draw_series(
                    series
                        .points
                        .iter()
                        .map(|&p| Circle::new(p, 3, color.filled())),
                )?;
            }
        }
        chart
            .configure_series_labels()
            .position(legend_position(&spec.series, (y_low, y_high)))
            .label_font((FONT_FAMILY, 14))
            .background_style(WHITE.mix(0.85))
            .border_style(BLACK.mix(0.4))
            .draw()?;
        root.present()?;
    }
    let mut png = Vec::new();
    image::codecs::png::PngEncoder::new(Cursor::new(&mut png))
        .write_image(&rgb, width, height, image::ExtendedColorType::Rgb8)
        .map_err(|e| anyhow!("encoding PNG: {e}"))?;
    Ok(png)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A fresh folder under the system temp dir, removed when dropped.
    struct TempDir(PathBuf);

    impl TempDir {
        fn new(name: &str) -> TempDir {
            let dir =
                std::env::temp_dir().join(format!("nerve-plot-{name}-{}", std::process::id()));
            let _ = std::fs::remove_dir_all(&dir);
            std::fs::create_dir_all(&dir).unwrap();
            TempDir(dir)
        }
    }

    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    fn record(json: &str) -> Record {
        match serde_json::from_str(json).unwrap() {
            Value::Object(map) => map,
            other => panic!("not an object: {other}"),
        }
    }

    /// A small classifier run: 30 train steps, evaluations every 10, one test, with a NaN
    /// loss, a null accuracy and a missing field along the way.
    fn synthetic_run() -> Vec<Record> {
        let mut records = Vec::new();
        for step in 1..=30 {
            let loss = 2.3 * (-(step as f64) / 12.0).exp() + 0.1;
            let lr = 1e-3 * (step as f64 / 5.0).min(1.0);
            let acc = 1.0 - loss / 2.5;
            let loss_field = if step == 7 {
                "NaN".to_string()
            } else {
                format!("{loss}")
            };
            let acc_field = if step == 8 {
                "null".to_string()
            } else {
                format!("{acc}")
            };
            let text = format!(
                r#"{{"kind":"train","step":{step},"epoch":{},"time_s":{},"loss":{loss_field},"lr":{lr},"grad_norm":1.5,"samples_per_s":100.0,"accuracy":{acc_field}}}"#,
                step as f64 / 10.0,
                step as f64 * 0.5
            );
            // serde_json rejects NaN literals: a NaN arrives as a string or null, both skipped.
            let text = text.replace("NaN", "\"NaN\"");
            records.push(record(&text));
            if step % 10 == 0 {
                records.push(record(&format!(
                    r#"{{"kind":"eval","step":{step},"time_s":{},"val_loss":{},"val_accuracy":{}}}"#,
                    step as f64 * 0.5,
                    loss + 0.1,
                    acc - 0.05
                )));
            }
        }
        records.push(record(
            r#"{"kind":"test","step":30,"test_loss":0.4,"test_accuracy":0.9}"#,
        ));
        records
    }

    fn decode(path: &Path) -> image::DynamicImage {
        image::open(path)
            .unwrap_or_else(|e| panic!("{} is not a readable image: {e}", path.display()))
    }

    #[test]
    fn read_metrics_skips_truncated_last_line() {
        let dir = TempDir::new("truncated");
        let path = dir.0.join("metrics.jsonl");
        std::fs::write(
            &path,
            "{\"kind\":\"train\",\"step\":1,\"loss\":2.0}\n\n{\"kind\":\"train\",\"step\":2,\"loss\":1.5}\n{\"kind\":\"tr",
        )
        .unwrap();
        let records = read_metrics(&path).unwrap();
        assert_eq!(records.len(), 2);
        assert_eq!(records[1]["loss"], 1.5);
    }

    #[test]
    fn read_metrics_reports_bad_middle_line_with_file_and_number() {
        let dir = TempDir::new("bad-middle");
        let path = dir.0.join("metrics.jsonl");
        std::fs::write(
            &path,
            "{\"kind\":\"train\",\"step\":1}\n{\"kind\":\"train\",\"step\"\n{\"kind\":\"train\",\"step\":3}\n",
        )
        .unwrap();
        let message = format!("{:#}", read_metrics(&path).unwrap_err());
        assert!(message.contains("metrics.jsonl"), "{message}");
        assert!(message.contains("line 2"), "{message}");
    }

    #[test]
    fn read_metrics_rejects_non_object_line() {
        let message = format!("{:#}", parse_metrics("[1, 2]\n{\"step\":1}\n").unwrap_err());
        assert!(
            message.contains("line 1") && message.contains("object"),
            "{message}"
        );
    }

    #[test]
    fn read_metrics_missing_file_names_it() {
        let message = format!(
            "{:#}",
            read_metrics(Path::new("/nonexistent/nerve/metrics.jsonl")).unwrap_err()
        );
        assert!(
            message.contains("/nonexistent/nerve/metrics.jsonl"),
            "{message}"
        );
    }

    #[test]
    fn read_metrics_later_record_wins_for_repeated_step() {
        // A run logged steps 1..3 and an eval at 2, then resumed from step 1 and re-logged 2..4.
        let text = r#"{"kind":"train","step":1,"loss":3.0}
{"kind":"train","step":2,"loss":2.5}
{"kind":"eval","step":2,"val_loss":2.7}
{"kind":"train","step":3,"loss":2.0}
{"kind":"train","step":2,"loss":2.4}
{"kind":"train","step":3,"loss":1.9}
{"kind":"train","step":4.0,"loss":1.8}
"#;
        let records = parse_metrics(text).unwrap();
        let train: Vec<(i64, f64)> = series_points(&records, "train", "loss");
        assert_eq!(train, vec![(1, 3.0), (2, 2.4), (3, 1.9), (4, 1.8)]);
        // The eval at step 2 shares the step but not the kind: it stays.
        assert_eq!(series_points(&records, "eval", "val_loss"), vec![(2, 2.7)]);
        assert_eq!(records.len(), 5);
    }

    #[test]
    fn write_plots_writes_valid_pngs_of_the_right_size() {
        let dir = TempDir::new("synthetic");
        let written = write_plots(&dir.0, &synthetic_run()).unwrap();
        let names: Vec<_> = written
            .iter()
            .map(|p| p.file_name().unwrap().to_string_lossy().into_owned())
            .collect();
        assert_eq!(names, ["loss.png", "accuracy.png", "lr.png"]);
        for path in &written {
            let image = decode(path);
            assert_eq!((image.width(), image.height()), (PLOT_WIDTH, PLOT_HEIGHT));
            // Something besides the white background was drawn: text and lines.
            let rgb = image.to_rgb8();
            let dark = rgb
                .pixels()
                .filter(|p| p.0.iter().all(|&c| c < 100))
                .count();
            assert!(dark > 500, "{}: only {dark} dark pixels", path.display());
        }
        // No temporary files are left behind.
        let leftovers = std::fs::read_dir(&dir.0).unwrap().count();
        assert_eq!(leftovers, 3);
    }

    #[test]
    fn write_plots_skips_accuracy_for_a_run_without_it() {
        let dir = TempDir::new("no-accuracy");
        let records: Vec<Record> = (0..5)
            .map(|s| {
                record(&format!(
                    r#"{{"kind":"train","step":{s},"loss":{},"lr":0.01}}"#,
                    1.0 / (s + 1) as f64
                ))
            })
            .collect();
        let written = write_plots(&dir.0, &records).unwrap();
        assert_eq!(written, vec![dir.0.join("loss.png"), dir.0.join("lr.png")]);
    }

    #[test]
    fn write_plots_handles_a_single_point_and_constant_values() {
        let dir = TempDir::new("single");
        let records = vec![
            record(r#"{"kind":"train","step":0,"loss":0.5,"lr":0.001}"#),
            record(r#"{"kind":"eval","step":0,"val_loss":0.5}"#),
        ];
        let written = write_plots(&dir.0, &records).unwrap();
        assert_eq!(written.len(), 2);
        for path in &written {
            let image = decode(path);
            assert_eq!((image.width(), image.height()), (PLOT_WIDTH, PLOT_HEIGHT));
        }
    }

    #[test]
    fn write_plots_of_no_records_writes_nothing() {
        let dir = TempDir::new("empty");
        assert!(write_plots(&dir.0, &[]).unwrap().is_empty());
        // Records with only non-finite or missing values are as good as none.
        let records = vec![record(r#"{"kind":"train","step":1,"loss":null}"#)];
        assert!(write_plots(&dir.0, &records).unwrap().is_empty());
        assert_eq!(std::fs::read_dir(&dir.0).unwrap().count(), 0);
    }

    #[test]
    fn tick_labels_stay_short() {
        assert_eq!(tick_label(0.0), "0");
        assert_eq!(tick_label(2.5), "2.5");
        assert_eq!(tick_label(100.0), "100");
        assert_eq!(tick_label(0.0003), "3.0e-4");
    }

    /// Renders the synthetic run into `NERVE_PLOT_DEMO_DIR` for a person to look at; does
    /// nothing when the variable is unset.
    #[test]
    fn demo_plots_for_inspection() {
        if let Some(dir) = std::env::var_os("NERVE_PLOT_DEMO_DIR") {
            let dir = Path::new(&dir);
            write_plots(dir, &synthetic_run()).unwrap();
            let single = vec![
                record(r#"{"kind":"train","step":0,"loss":0.5,"lr":0.001}"#),
                record(r#"{"kind":"eval","step":0,"val_loss":0.5}"#),
            ];
            write_plots(&dir.join("single"), &single).unwrap();
        }
    }
}

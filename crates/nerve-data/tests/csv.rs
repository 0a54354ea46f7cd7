mod common;

use common::{gzip, temp_path};
use nerve_data::{load_csv, CsvOptions, DataError};

fn write(name: &str, text: &str) -> std::path::PathBuf {
    let path = temp_path(name);
    std::fs::write(&path, text).unwrap();
    path
}

#[test]
fn without_header() {
    let path = write("plain.csv", "1,2.5,0\n\n-3, 4e-1 ,2\r\n5,6,1\n");
    let ds = load_csv(&path, &CsvOptions::default()).unwrap();
    assert_eq!(ds.len(), 3);
    assert_eq!(ds.sample_dims(), &[2]);
    assert_eq!(ds.num_classes(), 3);
    assert_eq!(ds.features(), &[1.0, 2.5, -3.0, 0.4, 5.0, 6.0]);
    assert_eq!(ds.labels(), &[0, 2, 1]);
    std::fs::remove_file(&path).unwrap();
}

#[test]
fn with_header_label_column_and_gzip() {
    let text = "label,a,b\n1,0.5,1.5\n0.0,2,3\n";
    let path = temp_path("header.csv");
    std::fs::write(&path, gzip(text.as_bytes())).unwrap();
    let opts = CsvOptions {
        label_column: Some(0),
        ..CsvOptions::default()
    };
    let ds = load_csv(&path, &opts).unwrap();
    assert_eq!(ds.len(), 2);
    assert_eq!(ds.features(), &[0.5, 1.5, 2.0, 3.0]);
    assert_eq!(ds.labels(), &[1, 0]);

    // header: Some(false) forces the first line to be data, which then fails to parse.
    let opts = CsvOptions {
        header: Some(false),
        ..opts
    };
    let err = load_csv(&path, &opts).unwrap_err();
    assert!(
        matches!(
            err,
            DataError::Parse {
                line: 1,
                column: 1,
                ..
            }
        ),
        "{err:?}"
    );
    std::fs::remove_file(&path).unwrap();
}

#[test]
fn bad_values_name_line_and_column() {
    let cases = [
        ("1,2,0\n3,x,1\n", 2, 2, "expected a finite number"),
        ("a,b,c\n1,2,0\n\n3,4,1.5\n", 4, 3, "non-negative integer"),
        ("1,2,0\n3,4,-1\n", 2, 3, "non-negative integer"),
        ("1,2,0\n3,4\n", 2, 3, "expected 3 fields"),
        ("1,2,0\n3,4,5,6\n", 2, 4, "found 4"),
        ("1,inf,0\n", 1, 2, "finite"),
    ];
    for (text, line, column, needle) in cases {
        let path = write("bad.csv", text);
        let err = load_csv(&path, &CsvOptions::default()).unwrap_err();
        let msg = err.to_string();
        assert!(
            matches!(err, DataError::Parse { line: l, column: c, .. } if l == line && c == column),
            "{text:?}: {err:?}"
        );
        assert!(
            msg.starts_with(&format!("{}:{line}:{column}:", path.display())),
            "{msg}"
        );
        assert!(msg.contains(needle), "{msg}");
        std::fs::remove_file(&path).unwrap();
    }
}

#[test]
fn other_errors() {
    let path = write("empty.csv", "a,b\n\n");
    let msg = load_csv(&path, &CsvOptions::default())
        .unwrap_err()
        .to_string();
    assert!(msg.contains("no data rows"), "{msg}");

    std::fs::write(&path, "1,2,5\n").unwrap();
    let opts = CsvOptions {
        num_classes: Some(3),
        ..CsvOptions::default()
    };
    let msg = load_csv(&path, &opts).unwrap_err().to_string();
    assert!(
        msg.contains(":1:3:") && msg.contains("num_classes = 3"),
        "{msg}"
    );

    let opts = CsvOptions {
        label_column: Some(7),
        ..CsvOptions::default()
    };
    let msg = load_csv(&path, &opts).unwrap_err().to_string();
    assert!(msg.contains("label column 7 out of range"), "{msg}");
    std::fs::remove_file(&path).unwrap();
}

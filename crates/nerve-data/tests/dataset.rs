use nerve_data::{digits, DataError, Dataset};

#[test]
fn digits_set() {
    let ds = digits();
    assert_eq!(ds.len(), 1797);
    assert_eq!(ds.sample_dims(), &[1, 8, 8]);
    assert_eq!(ds.num_classes(), 10);
    assert_eq!(ds.labels()[0], 0);
    let mut counts = [0usize; 10];
    for &l in ds.labels() {
        counts[l as usize] += 1;
    }
    assert!(
        counts.iter().all(|&c| (170..=185).contains(&c)),
        "{counts:?}"
    );
    assert!(ds.features().iter().all(|v| (0.0..=1.0).contains(v)));
    assert_eq!(ds.features().iter().cloned().fold(0.0, f32::max), 1.0);
    // The first row of the file starts 0,0,5,13,9,1,...
    assert_eq!(&ds.features()[..4], &[0.0, 0.0, 5.0 / 16.0, 13.0 / 16.0]);
}

fn toy(n: usize) -> Dataset {
    let features = (0..n * 2).map(|i| i as f32).collect();
    let labels = (0..n as i64).map(|i| i % 3).collect();
    Dataset::new(features, vec![2], labels, 3).unwrap()
}

#[test]
fn split_sizes_and_determinism() {
    let ds = digits();
    let (a, b) = ds.split(0.8, 1);
    assert_eq!((a.len(), b.len()), (1438, 359));
    assert_eq!(a.sample_dims(), ds.sample_dims());
    let (a2, b2) = ds.split(0.8, 1);
    assert_eq!((&a, &b), (&a2, &b2));
    let (a3, _) = ds.split(0.8, 2);
    assert_ne!(a.labels(), a3.labels());

    // The two parts partition the samples (the toy features identify the sample).
    let ds = toy(50);
    let (a, b) = ds.split(0.3, 9);
    assert_eq!((a.len(), b.len()), (15, 35));
    let mut ids: Vec<f32> = a
        .features()
        .iter()
        .chain(b.features())
        .step_by(2)
        .cloned()
        .collect();
    ids.sort_by(f32::total_cmp);
    assert_eq!(ids, (0..50).map(|i| (2 * i) as f32).collect::<Vec<_>>());

    assert_eq!(ds.split(1.5, 0).0.len(), 50);
    assert_eq!(ds.split(-1.0, 0).0.len(), 0);
    assert_eq!(ds.split(f64::NAN, 0).1.len(), 50);
}

#[test]
fn subset_batch_mean_std_normalize() {
    let mut ds = toy(4);
    let s = ds.subset(&[3, 1, 3]).unwrap();
    assert_eq!(s.features(), &[6.0, 7.0, 2.0, 3.0, 6.0, 7.0]);
    assert_eq!(s.labels(), &[0, 1, 0]);
    assert!(matches!(ds.subset(&[4]), Err(DataError::Invalid(_))));

    let (x, y) = ds.batch(&[2, 0]).unwrap();
    assert_eq!(x.dims(), &[2, 2]);
    assert_eq!(x.to_vec::<f32>().unwrap(), vec![4.0, 5.0, 0.0, 1.0]);
    assert_eq!(y.dims(), &[2]);
    assert_eq!(y.to_vec::<i64>().unwrap(), vec![2, 0]);
    assert!(ds.batch(&[0, 9]).is_err());

    let (mean, std) = ds.mean_std();
    assert!((mean - 3.5).abs() < 1e-6);
    assert!((std - 5.25f32.sqrt()).abs() < 1e-6);
    ds.normalize(mean, std).unwrap();
    let (m2, s2) = ds.mean_std();
    assert!(m2.abs() < 1e-6 && (s2 - 1.0).abs() < 1e-6, "{m2} {s2}");
    assert!(ds.normalize(0.0, 0.0).is_err());
    assert!(ds.normalize(f32::NAN, 1.0).is_err());
}

#[test]
fn new_validates() {
    assert!(Dataset::new(vec![0.0; 5], vec![2], vec![0, 1], 2).is_err());
    assert!(Dataset::new(vec![0.0; 4], vec![2], vec![0, 2], 2).is_err());
    assert!(Dataset::new(vec![0.0; 4], vec![2], vec![0, -1], 2).is_err());
    let e = Dataset::new(vec![], vec![3], vec![], 0).unwrap();
    assert!(e.is_empty());
    assert_eq!(e.mean_std(), (0.0, 0.0));
    assert_eq!(e.split(0.5, 0).0.len(), 0);
}

//! Datasets, file loading, quality metrics and plots.

use std::path::PathBuf;

use candle_core::{DType, Device, Tensor};
use flow_matching::data::{self, DataSource, Dataset, Toy};
use flow_matching::metrics::{self, Bandwidth, MmdEstimator};
#[cfg(feature = "plot")]
use flow_matching::plot;
use flow_matching::Error;
use rand::rngs::StdRng;
use rand::SeedableRng;

/// A fresh, empty directory for one test.
fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("fm-data-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn rows(t: &Tensor) -> Vec<Vec<f32>> {
    t.to_vec2::<f32>().unwrap()
}

fn col(v: &[f32]) -> Tensor {
    Tensor::from_vec(v.to_vec(), (v.len(), 1), &Device::Cpu).unwrap()
}

// ---------------------------------------------------------------- toys

#[test]
fn toys_have_shape_scale_and_seeding() {
    for toy in Toy::ALL {
        let n = 4000;
        let x = toy.sample(n, &mut StdRng::seed_from_u64(3)).unwrap();
        assert_eq!(x.dims(), &[n, 2], "{toy}");
        assert_eq!(x.dtype(), DType::F32);
        let v = rows(&x);
        for k in 0..2 {
            let mean = v.iter().map(|p| p[k] as f64).sum::<f64>() / n as f64;
            let var = v.iter().map(|p| (p[k] as f64 - mean).powi(2)).sum::<f64>() / n as f64;
            assert!(mean.abs() < 0.1, "{toy}: mean {mean} of coordinate {k}");
            assert!(
                (0.8..2.0).contains(&var.sqrt()),
                "{toy}: std {} of coordinate {k}",
                var.sqrt()
            );
        }
        assert!(
            v.iter().flatten().all(|c| c.is_finite() && c.abs() < 3.6),
            "{toy}: a point outside [-3.6, 3.6]²"
        );
        let same = toy.sample(n, &mut StdRng::seed_from_u64(3)).unwrap();
        assert_eq!(rows(&same), v, "{toy}: same seed, same points");
        let other = toy.sample(n, &mut StdRng::seed_from_u64(4)).unwrap();
        assert_ne!(rows(&other), v, "{toy}: another seed, other points");
        assert_eq!(Toy::from_name(toy.name()), Some(toy));
    }
}

#[test]
fn toys_have_their_shapes() {
    let mut rng = StdRng::seed_from_u64(0);
    let v = rows(&Toy::EightGaussians.sample(2000, &mut rng).unwrap());
    for p in &v {
        let a = (p[1] as f64).atan2(p[0] as f64);
        let k = (a / (std::f64::consts::PI / 4.0)).round();
        let centre = (
            2.0 * (k * std::f64::consts::PI / 4.0).cos(),
            2.0 * (k * std::f64::consts::PI / 4.0).sin(),
        );
        let d = ((p[0] as f64 - centre.0).powi(2) + (p[1] as f64 - centre.1).powi(2)).sqrt();
        assert!(
            d < 1.2,
            "8gaussians point {p:?} is {d} from the nearest centre"
        );
    }
    let v = rows(&Toy::Checkerboard.sample(2000, &mut rng).unwrap());
    for p in &v {
        let (i, j) = (
            ((p[0] + 3.0) / 1.5).floor() as i32,
            ((p[1] + 3.0) / 1.5).floor() as i32,
        );
        assert_eq!((i + j) % 2, 0, "checkerboard point {p:?} in an empty cell");
    }
    let v = rows(&Toy::Circles.sample(2000, &mut rng).unwrap());
    let inner = v.iter().filter(|p| p[0].hypot(p[1]) < 1.5).count();
    for p in &v {
        let r = p[0].hypot(p[1]);
        assert!(
            (r - 1.0).abs() < 0.5 || (r - 2.0).abs() < 0.5,
            "circles radius {r}"
        );
    }
    assert!(
        (850..1150).contains(&inner),
        "{inner} of 2000 on the inner circle"
    );
    let v = rows(&Toy::SwissRoll.sample(2000, &mut rng).unwrap());
    for p in &v {
        let r = (p[0] + 0.4).hypot(p[1]);
        assert!((0.6..3.3).contains(&r), "swissroll radius {r}");
    }
}

#[test]
fn moons_carry_two_classes() {
    let (x, labels) = Toy::Moons
        .sample_labeled(2000, &mut StdRng::seed_from_u64(1))
        .unwrap();
    let labels = labels.unwrap();
    assert_eq!(labels.len(), 2000);
    let v = rows(&x);
    let mean_y = |c: u32| {
        let ys: Vec<f32> = v
            .iter()
            .zip(&labels)
            .filter(|(_, &l)| l == c)
            .map(|(p, _)| p[1])
            .collect();
        (ys.len(), ys.iter().sum::<f32>() / ys.len() as f32)
    };
    let ((n0, y0), (n1, y1)) = (mean_y(0), mean_y(1));
    assert_eq!(n0 + n1, 2000);
    assert!((900..1100).contains(&n0), "{n0} upper points");
    // Upper arc: 2 (sin t - 0.25) has mean 4/π - 0.5; the lower arc is its mirror.
    let upper = 4.0 / std::f32::consts::PI - 0.5;
    assert!(
        (y0 - upper).abs() < 0.05 && (y1 + upper).abs() < 0.05,
        "{y0} {y1}"
    );
    assert_eq!(Toy::Moons.num_classes(), 2);
    for toy in &Toy::ALL[1..] {
        let (_, l) = toy
            .sample_labeled(10, &mut StdRng::seed_from_u64(1))
            .unwrap();
        assert_eq!(l, None, "{toy}");
        assert_eq!(toy.num_classes(), 0);
    }
    assert!(matches!(
        Toy::Moons.sample(0, &mut StdRng::seed_from_u64(1)),
        Err(Error::ZeroBatch)
    ));
}

// ---------------------------------------------------------------- sources

#[test]
fn data_source_parses_names_and_paths() {
    for toy in Toy::ALL {
        assert_eq!(DataSource::parse(toy.name()).unwrap(), DataSource::Toy(toy));
    }
    assert_eq!("digits".parse::<DataSource>().unwrap(), DataSource::Digits);
    let dir = scratch("parse");
    let file = dir.join("pts.csv");
    std::fs::write(&file, "1,2\n").unwrap();
    let src = DataSource::parse(file.to_str().unwrap()).unwrap();
    assert_eq!(
        src,
        DataSource::File {
            path: file.clone(),
            label_column: None
        }
    );
    assert_eq!(
        src.clone().with_label_column(Some(1)).unwrap(),
        DataSource::File {
            path: file.clone(),
            label_column: Some(1)
        }
    );
    assert_eq!(
        DataSource::Digits
            .with_label_column(Some(0))
            .unwrap_err()
            .to_string(),
        "invalid label column 0: only for data files; digits has its labels built in"
    );
    assert_eq!(
        DataSource::parse("nope").unwrap_err().to_string(),
        "unknown dataset \"nope\"; expected one of: moons, 8gaussians, checkerboard, circles, \
         swissroll, digits, driving, or the path of an existing .csv or .npy file"
    );
    // A directory is not a data file.
    assert!(DataSource::parse(dir.to_str().unwrap()).is_err());
}

#[test]
fn data_source_loads_and_draws() {
    let src = DataSource::Toy(Toy::Moons);
    let a = src.load(300, 9).unwrap();
    let b = src.load(300, 9).unwrap();
    assert_eq!((a.len(), a.x_dims(), a.num_classes), (300, &[2][..], 2));
    assert_eq!(rows(&a.x), rows(&b.x));
    assert_eq!(a.labels, b.labels);
    assert_ne!(rows(&a.x), rows(&src.load(300, 10).unwrap().x));
    assert!(src.is_infinite());
    let mut rng = StdRng::seed_from_u64(5);
    let (x1, l1) = src.draw_batch(&mut rng, 64).unwrap();
    let (x2, _) = src.draw_batch(&mut rng, 64).unwrap();
    assert_eq!(x1.dims(), &[64, 2]);
    assert_eq!(l1.unwrap().len(), 64);
    assert_ne!(rows(&x1), rows(&x2), "each draw is fresh");
    let c = DataSource::Toy(Toy::Circles).load(50, 0).unwrap();
    assert_eq!((c.labels, c.num_classes), (None, 0));
    assert!(!DataSource::Digits.is_infinite());
    assert_eq!(
        DataSource::Digits
            .draw_batch(&mut rng, 4)
            .unwrap_err()
            .to_string(),
        "invalid data source digits: a toy distribution for fresh batches; load a finite \
         dataset and use Dataset::random_batch"
    );
    assert_eq!(DataSource::Digits.x_dims(), Some(vec![64]));
}

#[test]
fn digits_match_the_documented_file() {
    let d = data::digits().unwrap();
    assert_eq!(d.x.dims(), &[1797, 64]);
    assert_eq!(d.num_classes, 10);
    assert_eq!(
        d.class_counts(),
        vec![178, 182, 177, 183, 181, 182, 181, 179, 174, 180]
    );
    let v = rows(&d.x);
    let (lo, hi) = v
        .iter()
        .flatten()
        .fold((f32::MAX, f32::MIN), |(a, b), &x| (a.min(x), b.max(x)));
    assert_eq!((lo, hi), (-1.0, 1.0));
    // First row of the file: 0,0,5,13,9,1,0,0,... label 0; last row's label is 8.
    assert_eq!(
        &v[0][..6],
        &[
            -1.0,
            -1.0,
            5.0 / 8.0 - 1.0,
            13.0 / 8.0 - 1.0,
            9.0 / 8.0 - 1.0,
            1.0 / 8.0 - 1.0
        ]
    );
    let labels = d.labels.as_ref().unwrap();
    assert_eq!((labels[0], labels[1], labels[1796]), (0, 1, 8));
    // Mean pixel 4.88 (README) is 4.88 / 8 - 1 after scaling.
    let mean = v.iter().flatten().map(|&x| x as f64).sum::<f64>() / (1797.0 * 64.0);
    assert!((mean - (4.88 / 8.0 - 1.0)).abs() < 0.002, "{mean}");
}

#[test]
fn dataset_batches() {
    let x = Tensor::arange(0f32, 10.0, &Device::Cpu)
        .unwrap()
        .reshape((5, 2))
        .unwrap();
    let d = Dataset::new(x, Some(vec![0, 1, 2, 0, 1]), 3).unwrap();
    let (b, l) = d.batch(&[4, 0, 4]).unwrap();
    assert_eq!(
        rows(&b),
        vec![vec![8.0, 9.0], vec![0.0, 1.0], vec![8.0, 9.0]]
    );
    assert_eq!(l, Some(vec![1, 0, 1]));
    assert_eq!(
        d.batch(&[5]).unwrap_err().to_string(),
        "invalid index 5: below the dataset size 5"
    );
    let (r1, _) = d.random_batch(&mut StdRng::seed_from_u64(2), 7).unwrap();
    let (r2, _) = d.random_batch(&mut StdRng::seed_from_u64(2), 7).unwrap();
    assert_eq!(r1.dims(), &[7, 2]);
    assert_eq!(rows(&r1), rows(&r2));
    let mut seen: Vec<f32> = d
        .epoch_batches(&mut StdRng::seed_from_u64(2), 2)
        .unwrap()
        .iter()
        .flat_map(|(x, _)| rows(x).into_iter().map(|r| r[0]))
        .collect();
    seen.sort_by(f32::total_cmp);
    assert_eq!(
        seen,
        vec![0.0, 2.0, 4.0, 6.0, 8.0],
        "an epoch visits every row once"
    );
    assert_eq!(d.clone().without_labels().num_classes, 0);
    assert_eq!(
        Dataset::new(
            Tensor::zeros((2, 2), DType::F32, &Device::Cpu).unwrap(),
            Some(vec![0, 3]),
            3
        )
        .unwrap_err()
        .to_string(),
        "invalid label 3: below num_classes = 3"
    );
}

// ---------------------------------------------------------------- files

#[test]
fn csv_with_header_and_label_column() {
    let dir = scratch("csv");
    let p = dir.join("a.csv");
    std::fs::write(&p, "label, x, y\n2, 0.5, -1\n\n0, 1e-1, 3\n").unwrap();
    let d = data::load_file(&p, Some(0)).unwrap();
    assert_eq!(rows(&d.x), vec![vec![0.5, -1.0], vec![0.1, 3.0]]);
    assert_eq!((d.labels, d.num_classes), (Some(vec![2, 0]), 3));
    let d = data::load_csv(&p, None).unwrap();
    assert_eq!(rows(&d.x), vec![vec![2.0, 0.5, -1.0], vec![0.0, 0.1, 3.0]]);
    assert_eq!((d.labels, d.num_classes), (None, 0));
    // No header: the first line is data.
    std::fs::write(&p, "1,2\n3,4\n").unwrap();
    assert_eq!(data::load_file(&p, None).unwrap().len(), 2);
    let src = DataSource::parse(p.to_str().unwrap())
        .unwrap()
        .with_label_column(Some(1))
        .unwrap();
    let d = src.load(0, 0).unwrap();
    assert_eq!(
        (rows(&d.x), d.labels),
        (vec![vec![1.0], vec![3.0]], Some(vec![2, 4]))
    );
}

#[test]
fn npy_f32_and_f64_with_label_column() {
    let dir = scratch("npy");
    let p32 = dir.join("a.npy");
    let t = Tensor::new(&[[0.5f32, 1.0, 3.0], [2.0, -1.5, 0.0]], &Device::Cpu).unwrap();
    t.write_npy(&p32).unwrap();
    let d = data::load_file(&p32, Some(2)).unwrap();
    assert_eq!(rows(&d.x), vec![vec![0.5, 1.0], vec![2.0, -1.5]]);
    assert_eq!((d.labels, d.num_classes), (Some(vec![3, 0]), 4));
    let p64 = dir.join("b.dat");
    t.to_dtype(DType::F64).unwrap().write_npy(&p64).unwrap();
    let d = data::load_file(&p64, None).unwrap();
    assert_eq!(rows(&d.x), rows(&t));
    let d = DataSource::parse(p64.to_str().unwrap())
        .unwrap()
        .load(0, 0)
        .unwrap();
    assert_eq!(d.x_dims(), &[3]);
}

/// The message of loading `text` as CSV with `label_column`.
fn csv_error(text: &str, label_column: Option<usize>) -> String {
    let dir = scratch("bad");
    let p = dir.join("bad.csv");
    std::fs::write(&p, text).unwrap();
    let e = data::load_file(&p, label_column).unwrap_err();
    assert!(matches!(e, Error::DataFile { .. }), "{e:?}");
    e.to_string()
        .strip_prefix(&format!("data file {}: ", p.display()))
        .unwrap_or_else(|| panic!("message does not name the file: {e}"))
        .to_string()
}

#[test]
fn bad_csv_files_say_where_and_what() {
    assert_eq!(
        csv_error("", None),
        "empty file: expected lines of comma-separated numbers"
    );
    assert_eq!(
        csv_error("\n  \n", None),
        "empty file: expected lines of comma-separated numbers"
    );
    assert_eq!(
        csv_error("x,y\n", None),
        "no data: line 1 looks like a header and no lines of numbers follow"
    );
    assert_eq!(
        csv_error("1,2\n3,4\n5\n", None),
        "line 3: expected 2 comma-separated values (as on line 1), found 1"
    );
    assert_eq!(
        csv_error("a,b\n1,2\n3,x4\n", None),
        "line 3, column 2: expected a number, found \"x4\""
    );
    assert_eq!(
        csv_error("1,2\n3,\n", None),
        "line 2, column 2: expected a number, found \"\""
    );
    assert_eq!(
        csv_error("1,2\nnan,4\n", None),
        "line 2, column 1: expected a finite number (within f32 range), found \"nan\""
    );
    assert_eq!(
        csv_error("1,-inf\n", None),
        "line 1, column 2: expected a finite number (within f32 range), found \"-inf\""
    );
    assert_eq!(
        csv_error("1,1e40\n", None),
        "line 1, column 2: expected a finite number (within f32 range), found \"1e40\""
    );
    assert_eq!(
        csv_error("1,0\n2,1.5\n", Some(1)),
        "line 2, column 2 (label column): expected a class label, an integer from 0 to 9999, found \"1.5\""
    );
    assert_eq!(
        csv_error("1,-1\n", Some(1)),
        "line 1, column 2 (label column): expected a class label, an integer from 0 to 9999, found \"-1\""
    );
    assert_eq!(
        csv_error("1,2\n", Some(2)),
        "label column 2 (0-based) does not exist: rows have 2 columns (0 to 1)"
    );
    assert_eq!(
        csv_error("1\n", Some(0)),
        "label column 0 is the only column: expected at least one feature column besides the labels"
    );
}

#[test]
fn bad_npy_files_and_missing_files() {
    let dir = scratch("badnpy");
    let p = dir.join("v.npy");
    Tensor::new(&[1f32, 2.0], &Device::Cpu)
        .unwrap()
        .write_npy(&p)
        .unwrap();
    assert_eq!(
        data::load_file(&p, None).unwrap_err().to_string(),
        format!(
            "data file {}: expected a 2-D array [rows, columns] (or [rows, *x_dims] without a label column), found shape [2]",
            p.display()
        )
    );
    Tensor::new(&[[1f32, 2.0], [f32::NAN, 0.0]], &Device::Cpu)
        .unwrap()
        .write_npy(&p)
        .unwrap();
    assert_eq!(
        data::load_file(&p, None).unwrap_err().to_string(),
        format!(
            "data file {}: row 2, column 1: expected a finite number, found NaN",
            p.display()
        )
    );
    Tensor::new(&[[1f32, 2.5]], &Device::Cpu)
        .unwrap()
        .write_npy(&p)
        .unwrap();
    assert_eq!(
        data::load_file(&p, Some(1)).unwrap_err().to_string(),
        format!(
            "data file {}: row 1, column 2 (label column): expected a class label, an integer from 0 to 9999, found \"2.5\"",
            p.display()
        )
    );
    let missing = dir.join("missing.csv");
    assert!(matches!(
        data::load_file(&missing, None),
        Err(Error::Io { .. })
    ));
}

// ---------------------------------------------------------------- metrics

#[test]
fn sliced_wasserstein_closed_forms() {
    // 1-D: every direction is ±1, so SW2 is the exact W2: a shift by 3 gives 3.
    let a = col(&[0.0, 1.0, 5.0]);
    let b = col(&[3.0, 4.0, 8.0]);
    assert!((metrics::sliced_wasserstein(&a, &b, 8, 0).unwrap() - 3.0).abs() < 1e-12);
    // Unequal sizes: W2²({0}, {0, 1}) = ∫ over the upper half of 1² = 1/2.
    let sw = metrics::sliced_wasserstein(&col(&[0.0]), &col(&[0.0, 1.0]), 4, 0).unwrap();
    assert!((sw - 0.5f64.sqrt()).abs() < 1e-12, "{sw}");
    // W2²({0, 1, 2}, {0, 3}): quantile gaps 0 on (0,1/3), 1 on (1/3,1/2), 2 on (1/2,2/3), 1 on (2/3,1),
    // so 1/6 + 4/6 + 1/3 = 7/6.
    let sw = metrics::sliced_wasserstein(&col(&[2.0, 0.0, 1.0]), &col(&[3.0, 0.0]), 4, 0).unwrap();
    assert!((sw - (7.0f64 / 6.0).sqrt()).abs() < 1e-12, "{sw}");
    // Point masses in D dims: E[(θ·d)²] = |d|²/D over uniform directions, so SW2 → |d|/sqrt(D).
    let d = 4;
    let x = Tensor::zeros((1, d), DType::F32, &Device::Cpu).unwrap();
    let y = Tensor::new(&[[3f32, 0.0, 4.0, 0.0]], &Device::Cpu).unwrap();
    let sw = metrics::sliced_wasserstein(&x, &y, 4000, 1).unwrap();
    assert!((sw - 5.0 / 2.0).abs() < 0.05, "{sw}");
    // Seeded: same seed same value, another seed a (slightly) different one.
    let sw2 = metrics::sliced_wasserstein(&x, &y, 4000, 1).unwrap();
    assert_eq!(sw, sw2);
    assert_ne!(sw, metrics::sliced_wasserstein(&x, &y, 4000, 2).unwrap());
    assert_eq!(metrics::sliced_wasserstein(&x, &x, 10, 0).unwrap(), 0.0);
    assert!(metrics::sliced_wasserstein(&x, &y, 0, 0).is_err());
    let z = Tensor::zeros((1, 3), DType::F32, &Device::Cpu).unwrap();
    assert_eq!(
        metrics::sliced_wasserstein(&x, &z, 10, 0)
            .unwrap_err()
            .to_string(),
        "second set of points: expected shape [M, 4] (the first set's sample size), got [1, 3]"
    );
}

#[test]
fn mmd_closed_forms() {
    let a = col(&[0.0, 1.0]);
    let b = col(&[0.0, 2.0]);
    let s = Bandwidth::Fixed(1.0);
    let e = |x: f64| x.exp();
    // Identical sets: the biased estimate is exactly 0 (whatever the bandwidth).
    let same = metrics::mmd2_rbf(&a, &a, s, MmdEstimator::Biased).unwrap();
    assert!(same.abs() < 1e-15, "{same}");
    // By hand, σ = 1: k(0,1) = e^-1/2, k(0,2) = e^-2, k(1,2) = e^-1/2.
    // Biased: (2 + 2e^-1/2)/4 + (2 + 2e^-2)/4 - 2 (1 + e^-2 + 2e^-1/2)/4.
    let biased = (2.0 + 2.0 * e(-0.5)) / 4.0 + (2.0 + 2.0 * e(-2.0)) / 4.0
        - 2.0 * (1.0 + e(-2.0) + 2.0 * e(-0.5)) / 4.0;
    let got = metrics::mmd2_rbf(&a, &b, s, MmdEstimator::Biased).unwrap();
    assert!((got - biased).abs() < 1e-12, "{got} vs {biased}");
    // Unbiased: e^-1/2 + e^-2 - 2 (1 + e^-2 + 2e^-1/2)/4 = (e^-2 - 1)/2.
    let got = metrics::mmd2_rbf(&a, &b, s, MmdEstimator::Unbiased).unwrap();
    assert!((got - (e(-2.0) - 1.0) / 2.0).abs() < 1e-12, "{got}");
    // Point masses: 2 - 2 exp(-d²/(2σ²)); σ = 2, d = 3.
    let got = metrics::mmd2_rbf(
        &col(&[0.0]),
        &col(&[3.0]),
        Bandwidth::Fixed(2.0),
        MmdEstimator::Biased,
    )
    .unwrap();
    assert!((got - (2.0 - 2.0 * e(-9.0 / 8.0))).abs() < 1e-12);
    // Median heuristic over the pooled {0, 1, 0, 2}: distances 1,0,2,1,1,2 → median (index 3 of sorted) 1.
    assert_eq!(metrics::median_bandwidth(&a, &b).unwrap(), 1.0);
    let med = metrics::mmd2_rbf(&a, &b, Bandwidth::Median, MmdEstimator::Unbiased).unwrap();
    assert!((med - (e(-2.0) - 1.0) / 2.0).abs() < 1e-12);
    assert_eq!(
        metrics::mmd2_rbf(&col(&[0.0]), &b, s, MmdEstimator::Unbiased)
            .unwrap_err()
            .to_string(),
        "invalid points 1 and 2: at least 2 points in each set for the unbiased MMD estimate"
    );
    assert!(metrics::mmd2_rbf(&a, &b, Bandwidth::Fixed(0.0), MmdEstimator::Biased).is_err());
}

#[test]
fn energy_distance_closed_forms() {
    // Point masses: 2|x - y|.
    let e = metrics::energy_distance(&col(&[1.0]), &col(&[-2.0])).unwrap();
    assert!((e - 6.0).abs() < 1e-12);
    // {0, 1} vs {3, 4}: E|X-Y| = (3 + 4 + 2 + 3)/4 = 3, E|X-X'| = E|Y-Y'| = 1/2 → 5.
    let e = metrics::energy_distance(&col(&[0.0, 1.0]), &col(&[3.0, 4.0])).unwrap();
    assert!((e - 5.0).abs() < 1e-12, "{e}");
    // A uniform grid of n points on [0, 1] and its copy shifted by s ≥ 1: E|X-Y| = s and
    // E|X-X'| = (n² - 1) / (3n²), so the distance is 2s - 2(n² - 1)/(3n²).
    let n = 500;
    let grid: Vec<f32> = (0..n).map(|i| (i as f32 + 0.5) / n as f32).collect();
    let shifted: Vec<f32> = grid.iter().map(|g| g + 1.5).collect();
    let e = metrics::energy_distance(&col(&grid), &col(&shifted)).unwrap();
    let nf = n as f64;
    let want = 3.0 - 2.0 * (nf * nf - 1.0) / (3.0 * nf * nf);
    assert!((e - want).abs() < 1e-5, "{e} vs {want}");
    let pts = Toy::Moons
        .sample(300, &mut StdRng::seed_from_u64(0))
        .unwrap();
    assert!(metrics::energy_distance(&pts, &pts).unwrap().abs() < 1e-9);
}

#[test]
fn metrics_separate_near_from_far() {
    let mut rng = StdRng::seed_from_u64(11);
    let real = Toy::EightGaussians.sample(1000, &mut rng).unwrap();
    let near = Toy::EightGaussians.sample(1000, &mut rng).unwrap();
    let far = Toy::Circles.sample(1000, &mut rng).unwrap();
    let r_near = metrics::compare(&real, &near, 0).unwrap();
    let r_far = metrics::compare(&real, &far, 0).unwrap();
    assert!(
        r_near.sliced_wasserstein < 0.15 && r_far.sliced_wasserstein > 0.3,
        "{r_near} / {r_far}"
    );
    assert!(
        r_near.mmd2.abs() < 0.003 && r_far.mmd2 > 0.01,
        "{r_near} / {r_far}"
    );
    assert!(
        r_near.energy < 0.01 && r_far.energy > 0.08,
        "{r_near} / {r_far}"
    );
}

#[test]
fn nearest_centroid_accuracy_on_digits() {
    let d = data::digits().unwrap();
    let labels = d.labels.clone().unwrap();
    // Real digits classified by their own class means: well above chance (0.1).
    let acc = metrics::nearest_centroid_accuracy(&d.x, &labels, &d.x, &labels).unwrap();
    assert!(acc > 0.85, "{acc}");
    // Asking for the wrong class (label + 1) is mostly refused.
    let wrong: Vec<u32> = labels.iter().map(|l| (l + 1) % 10).collect();
    let acc_wrong = metrics::nearest_centroid_accuracy(&d.x, &labels, &d.x, &wrong).unwrap();
    assert!(acc_wrong < 0.1, "{acc_wrong}");
    // A class centroid itself is classified as that class.
    let real = col(&[0.0, 2.0, 10.0, 12.0]);
    let acc = metrics::nearest_centroid_accuracy(
        &real,
        &[0, 0, 1, 1],
        &col(&[1.0, 11.0, 7.0]),
        &[0, 1, 0],
    )
    .unwrap();
    assert!((acc - 2.0 / 3.0).abs() < 1e-12);
    assert_eq!(
        metrics::nearest_centroid_accuracy(&real, &[0, 0, 1, 1], &col(&[1.0]), &[2])
            .unwrap_err()
            .to_string(),
        "invalid generated label 2: a class that occurs in the real labels (its centroid is needed)"
    );
}

// ---------------------------------------------------------------- plots

/// Asserts `dir` holds exactly the file `name`, a PNG.
#[cfg(feature = "plot")]
fn only_png(dir: &std::path::Path, name: &str) {
    let names: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(
        names,
        vec![name.to_string()],
        "no temporary file is left behind"
    );
    let bytes = std::fs::read(dir.join(name)).unwrap();
    assert!(bytes.len() > 1000, "{} bytes", bytes.len());
    assert!(bytes.starts_with(b"\x89PNG\r\n\x1a\n"));
}

#[cfg(feature = "plot")]
#[test]
fn plots_write_png_files_atomically() {
    let dir = scratch("plots");
    let mut rng = StdRng::seed_from_u64(0);
    let data = Toy::SwissRoll.sample(400, &mut rng).unwrap();
    let gen = Toy::SwissRoll.sample(200, &mut rng).unwrap();
    let traj = Tensor::stack(
        &[
            &gen.narrow(0, 0, 3).unwrap().zeros_like().unwrap(),
            &gen.narrow(0, 0, 3).unwrap(),
        ],
        1,
    )
    .unwrap();
    let p = dir.join("scatter.png");
    plot::scatter_2d(&p, &data, &gen, Some(&traj), "swissroll").unwrap();
    only_png(&dir, "scatter.png");
    // Overwriting works and still leaves one file.
    plot::scatter_2d(&p, &data, &gen, None, "again").unwrap();
    only_png(&dir, "scatter.png");
    assert_eq!(
        plot::scatter_2d(&p, &data, &traj, None, "x")
            .unwrap_err()
            .to_string(),
        "scatter generated samples: expected shape [N, 2], got [3, 2, 2]"
    );

    let dir = scratch("grid");
    let d = data::digits().unwrap();
    let labels: Vec<String> = (0..3).map(|r| format!("row {r}")).collect();
    plot::digit_grid(
        dir.join("g.png"),
        &d.x.narrow(0, 0, 12).unwrap(),
        3,
        4,
        Some(&labels),
        "digits",
    )
    .unwrap();
    only_png(&dir, "g.png");
    assert_eq!(
        plot::digit_grid(
            dir.join("h.png"),
            &d.x.narrow(0, 0, 13).unwrap(),
            3,
            4,
            None,
            ""
        )
        .unwrap_err()
        .to_string(),
        "invalid grid 3 x 4: at least 1 x 1 cells, enough for the 13 images"
    );

    let dir = scratch("loss");
    let losses: Vec<(usize, f64)> = (0..300).map(|s| (s, 1.0 / (1.0 + s as f64))).collect();
    plot::loss_curve(dir.join("l.png"), &losses, "loss").unwrap();
    only_png(&dir, "l.png");
    // Zero or negative losses fall back to a linear axis.
    plot::loss_curve(
        dir.join("l.png"),
        &[(0, 0.0), (1, -1.0), (2, f64::NAN)],
        "loss",
    )
    .unwrap();
    only_png(&dir, "l.png");
    assert!(plot::loss_curve(dir.join("m.png"), &[(0, f64::NAN)], "loss").is_err());
    // A missing directory is an error, not a panic.
    assert!(plot::loss_curve(dir.join("nope/l.png"), &losses, "loss").is_err());
}

//! PNG plots: 2-D samples with trajectories, digit grids, loss curves.
//!
//! Text uses an embedded ASCII subset of DejaVu Sans (assets/, with its license), so no
//! system fonts are needed. Each plot is drawn into memory and written atomically.

use std::path::Path;
use std::sync::OnceLock;

use candle_core::{DType, Device, Tensor};
use plotters::prelude::*;

use crate::error::{Error, Result};
use crate::io::atomic_write;

/// DejaVu Sans, printable ASCII only (see assets/README.md for its license).
static FONT: &[u8] = include_bytes!("../assets/DejaVuSans-ascii.ttf");

/// The family name the embedded font is registered under.
const FAMILY: &str = "sans-serif";

/// Registers the embedded font with plotters once; the result is shared by every later call.
fn font_ready(path: &Path) -> Result<()> {
    static READY: OnceLock<bool> = OnceLock::new();
    let ok = *READY
        .get_or_init(|| plotters::style::register_font(FAMILY, FontStyle::Normal, FONT).is_ok());
    if ok {
        Ok(())
    } else {
        Err(plot_err(path, "the embedded font could not be loaded"))
    }
}

fn plot_err(path: &Path, what: impl std::fmt::Display) -> Error {
    Error::io(
        path,
        std::io::Error::other(format!("cannot draw the plot: {what}")),
    )
}

/// Draws into a `w` × `h` RGB canvas with `draw`, then writes it as a PNG, atomically.
fn render(
    path: &Path,
    (w, h): (u32, u32),
    draw: impl FnOnce(&DrawingArea<BitMapBackend<'_>, plotters::coord::Shift>) -> Result<()>,
) -> Result<()> {
    font_ready(path)?;
    let mut rgb = vec![255u8; (w * h * 3) as usize];
    {
        let root = BitMapBackend::with_buffer(&mut rgb, (w, h)).into_drawing_area();
        root.fill(&WHITE).map_err(|e| plot_err(path, e))?;
        draw(&root)?;
        root.present().map_err(|e| plot_err(path, e))?;
    }
    let mut png_bytes = Vec::new();
    {
        let mut enc = png::Encoder::new(&mut png_bytes, w, h);
        enc.set_color(png::ColorType::Rgb);
        enc.set_depth(png::BitDepth::Eight);
        let mut writer = enc.write_header().map_err(|e| plot_err(path, e))?;
        writer
            .write_image_data(&rgb)
            .map_err(|e| plot_err(path, e))?;
    }
    atomic_write(path, &png_bytes)
}

/// The rows of a `[N, 2]` tensor as points.
fn points_2d(t: &Tensor, what: &str) -> Result<Vec<(f64, f64)>> {
    if t.rank() != 2 || t.dims()[1] != 2 {
        return Err(Error::Shape {
            what: what.into(),
            expected: "[N, 2]".into(),
            got: t.dims().to_vec(),
        });
    }
    let v = t
        .to_device(&Device::Cpu)?
        .to_dtype(DType::F64)?
        .to_vec2::<f64>()?;
    Ok(v.into_iter().map(|p| (p[0], p[1])).collect())
}

/// The blue of generated samples.
const GENERATED: RGBColor = RGBColor(31, 119, 180);
/// The orange of trajectories.
const PATHS: RGBColor = RGBColor(230, 85, 13);

/// Scatter plot of 2-D `data` `[N, 2]` (grey) and `generated` `[M, 2]` (blue), with optional
/// `trajectories` `[K, T + 1, 2]` (noise first, as in `Sample::trajectory`) drawn as thin
/// orange lines from a black start dot. The view is the data's bounding box plus a margin;
/// generated points outside it are clipped.
///
/// ```
/// use flow_matching::data::Toy;
/// use rand::{rngs::StdRng, SeedableRng};
/// let mut rng = StdRng::seed_from_u64(0);
/// let data = Toy::Moons.sample(500, &mut rng).unwrap();
/// let gen = Toy::Moons.sample(500, &mut rng).unwrap();
/// let path = std::env::temp_dir().join(format!("fm-doc-scatter-{}.png", std::process::id()));
/// flow_matching::plot::scatter_2d(&path, &data, &gen, None, "moons").unwrap();
/// assert!(std::fs::read(&path).unwrap().starts_with(b"\x89PNG"));
/// # std::fs::remove_file(&path).unwrap();
/// ```
pub fn scatter_2d(
    path: impl AsRef<Path>,
    data: &Tensor,
    generated: &Tensor,
    trajectories: Option<&Tensor>,
    title: &str,
) -> Result<()> {
    let path = path.as_ref();
    let data = points_2d(data, "scatter data")?;
    let generated = points_2d(generated, "scatter generated samples")?;
    let paths: Vec<Vec<(f64, f64)>> = match trajectories {
        None => Vec::new(),
        Some(t) => {
            if t.rank() != 3 || t.dims()[2] != 2 {
                return Err(Error::Shape {
                    what: "scatter trajectories".into(),
                    expected: "[K, T + 1, 2]".into(),
                    got: t.dims().to_vec(),
                });
            }
            (0..t.dims()[0])
                .map(|k| points_2d(&t.get(k)?, "trajectory"))
                .collect::<Result<_>>()?
        }
    };
    let finite = |p: &&(f64, f64)| p.0.is_finite() && p.1.is_finite();
    let (mut lo, mut hi) = ((f64::MAX, f64::MAX), (f64::MIN, f64::MIN));
    for p in data.iter().filter(finite) {
        lo = (lo.0.min(p.0), lo.1.min(p.1));
        hi = (hi.0.max(p.0), hi.1.max(p.1));
    }
    if lo.0 > hi.0 {
        (lo, hi) = ((-3.0, -3.0), (3.0, 3.0));
    }
    // A square view around the data keeps circles round.
    let half = 0.5 * (hi.0 - lo.0).max(hi.1 - lo.1).max(1e-6) * 1.15;
    let centre = (0.5 * (lo.0 + hi.0), 0.5 * (lo.1 + hi.1));
    let xr = (centre.0 - half)..(centre.0 + half);
    let yr = (centre.1 - half)..(centre.1 + half);
    render(path, (720, 760), |root| {
        let err = |e| plot_err(path, e);
        let mut chart = ChartBuilder::on(root)
            .caption(title, (FAMILY, 24))
            .margin(12)
            .x_label_area_size(30)
            .y_label_area_size(40)
            .build_cartesian_2d(xr, yr)
            .map_err(err)?;
        chart
            .configure_mesh()
            .light_line_style(WHITE.mix(0.0))
            .label_style((FAMILY, 14))
            .draw()
            .map_err(err)?;
        chart
            .draw_series(
                data.iter()
                    .map(|&p| Circle::new(p, 2, RGBColor(150, 150, 150).mix(0.5).filled())),
            )
            .map_err(err)?
            .label(format!("data ({})", data.len()))
            .legend(|(x, y)| Circle::new((x + 10, y), 4, RGBColor(150, 150, 150).filled()));
        chart
            .draw_series(
                generated
                    .iter()
                    .filter(finite)
                    .map(|&p| Circle::new(p, 2, GENERATED.mix(0.6).filled())),
            )
            .map_err(err)?
            .label(format!("generated ({})", generated.len()))
            .legend(|(x, y)| Circle::new((x + 10, y), 4, GENERATED.filled()));
        if !paths.is_empty() {
            for (k, p) in paths.iter().enumerate() {
                let s = chart
                    .draw_series(LineSeries::new(
                        p.iter().copied().filter(|q| finite(&q)),
                        PATHS.mix(0.8).stroke_width(1),
                    ))
                    .map_err(err)?;
                if k == 0 {
                    s.label(format!("trajectories ({})", paths.len()))
                        .legend(|(x, y)| PathElement::new([(x, y), (x + 20, y)], PATHS));
                }
            }
            chart
                .draw_series(
                    paths
                        .iter()
                        .filter_map(|p| p.first())
                        .map(|&p| Circle::new(p, 2, BLACK.filled())),
                )
                .map_err(err)?;
        }
        chart
            .configure_series_labels()
            .background_style(WHITE.mix(0.85))
            .border_style(BLACK.mix(0.4))
            .label_font((FAMILY, 14))
            .position(SeriesLabelPosition::UpperRight)
            .draw()
            .map_err(err)?;
        Ok(())
    })
}

/// A `rows` × `cols` grid of 8×8 greyscale images from `images` `[N, 64]` (or `[N, 8, 8]`)
/// in [-1, 1] (dark ink on white, row-major, top pixel row first), filled row by row;
/// N may be less than `rows * cols`. `row_labels` (one per row) are written on the left.
///
/// ```
/// let d = flow_matching::data::digits().unwrap();
/// let path = std::env::temp_dir().join(format!("fm-doc-grid-{}.png", std::process::id()));
/// flow_matching::plot::digit_grid(&path, &d.x.narrow(0, 0, 20).unwrap(), 2, 10, None, "digits")
///     .unwrap();
/// # std::fs::remove_file(&path).unwrap();
/// ```
pub fn digit_grid(
    path: impl AsRef<Path>,
    images: &Tensor,
    rows: usize,
    cols: usize,
    row_labels: Option<&[String]>,
    title: &str,
) -> Result<()> {
    let path = path.as_ref();
    let dims = images.dims();
    if dims.is_empty() || dims[1..].iter().product::<usize>() != 64 || dims[0] == 0 {
        return Err(Error::Shape {
            what: "digit images".into(),
            expected: "[N, 64] or [N, 8, 8] with N >= 1".into(),
            got: dims.to_vec(),
        });
    }
    let n = dims[0];
    if rows == 0 || cols == 0 || n > rows * cols {
        return Err(Error::invalid(
            "grid",
            format!("{rows} x {cols}"),
            format!("at least 1 x 1 cells, enough for the {n} images"),
        ));
    }
    if let Some(l) = row_labels {
        if l.len() != rows {
            return Err(Error::invalid(
                "row labels",
                format!("{} labels", l.len()),
                format!("one per row ({rows})"),
            ));
        }
    }
    let px = images
        .to_device(&Device::Cpu)?
        .to_dtype(DType::F32)?
        .flatten_all()?
        .to_vec1::<f32>()?;
    const SCALE: u32 = 4;
    const GAP: u32 = 4;
    let cell = 8 * SCALE + GAP;
    let left = if row_labels.is_some() { 60 } else { GAP };
    let top = if title.is_empty() { GAP } else { 36 };
    let w = left + cols as u32 * cell + GAP;
    let h = top + rows as u32 * cell + GAP;
    render(path, (w.max(160), h), |root| {
        let err = |e| plot_err(path, e);
        if !title.is_empty() {
            root.draw(&Text::new(
                title.to_string(),
                (left as i32, 8),
                (FAMILY, 20).into_font().color(&BLACK),
            ))
            .map_err(err)?;
        }
        for (r, label) in row_labels.into_iter().flatten().enumerate() {
            let y = (top + r as u32 * cell + 4 * SCALE - 7) as i32;
            root.draw(&Text::new(
                label.clone(),
                (6, y),
                (FAMILY, 15).into_font().color(&BLACK),
            ))
            .map_err(err)?;
        }
        for (k, img) in px.chunks(64).enumerate() {
            let x0 = (left + (k % cols) as u32 * cell) as i32;
            let y0 = (top + (k / cols) as u32 * cell) as i32;
            for (p, &v) in img.iter().enumerate() {
                let ink = if v.is_finite() {
                    ((v + 1.0) / 2.0).clamp(0.0, 1.0)
                } else {
                    0.0
                };
                let g = (255.0 * (1.0 - ink)).round() as u8;
                let (pr, pc) = ((p / 8) as i32, (p % 8) as i32);
                let s = SCALE as i32;
                let corner = (x0 + pc * s, y0 + pr * s);
                root.draw(&Rectangle::new(
                    [corner, (corner.0 + s, corner.1 + s)],
                    RGBColor(g, g, g).filled(),
                ))
                .map_err(err)?;
            }
        }
        Ok(())
    })
}

/// A training-loss curve: `losses` as (step, loss), raw in light blue with a moving average
/// in dark blue; the y axis is logarithmic when every loss is positive. Non-finite losses are
/// left out.
///
/// ```
/// let losses: Vec<(usize, f64)> = (0..100).map(|s| (s, 1.0 / (1.0 + s as f64))).collect();
/// let path = std::env::temp_dir().join(format!("fm-doc-loss-{}.png", std::process::id()));
/// flow_matching::plot::loss_curve(&path, &losses, "loss").unwrap();
/// # std::fs::remove_file(&path).unwrap();
/// ```
pub fn loss_curve(path: impl AsRef<Path>, losses: &[(usize, f64)], title: &str) -> Result<()> {
    let path = path.as_ref();
    let pts: Vec<(f64, f64)> = losses
        .iter()
        .filter(|(_, l)| l.is_finite())
        .map(|&(s, l)| (s as f64, l))
        .collect();
    if pts.is_empty() {
        return Err(Error::invalid(
            "losses",
            format!("{} values", losses.len()),
            "at least one finite (step, loss) pair",
        ));
    }
    let window = (pts.len() / 50).max(1);
    let smooth: Vec<(f64, f64)> = pts
        .windows(window)
        .map(|w| {
            let mid = w[w.len() / 2].0;
            (mid, w.iter().map(|p| p.1).sum::<f64>() / w.len() as f64)
        })
        .collect();
    let (x0, x1) = (pts[0].0, pts.iter().map(|p| p.0).fold(pts[0].0, f64::max));
    let xr = x0..x1.max(x0 + 1.0);
    let lo = pts.iter().map(|p| p.1).fold(f64::INFINITY, f64::min);
    let hi = pts.iter().map(|p| p.1).fold(f64::NEG_INFINITY, f64::max);
    // A log axis is drawn as log10(loss) on a linear axis, so tick labels can be placed
    // evenly (plotters' own log axis labels only the powers of ten and a few multiples).
    let log = lo > 0.0;
    let tf = |v: f64| if log { v.log10() } else { v };
    let pts: Vec<(f64, f64)> = pts.iter().map(|&(s, l)| (s, tf(l))).collect();
    let smooth: Vec<(f64, f64)> = smooth.iter().map(|&(s, l)| (s, tf(l))).collect();
    let (lo, hi) = (tf(lo), tf(hi));
    let pad = ((hi - lo) * 0.05).max(1e-6);
    let yr = (lo - pad)..(hi + pad);
    render(path, (800, 500), |root| {
        let err = |e| plot_err(path, e);
        let label = |y: &f64| {
            let v = if log { 10f64.powf(*y) } else { *y };
            if v != 0.0 && (v.abs() < 1e-2 || v.abs() >= 1e4) {
                format!("{v:.2e}")
            } else {
                format!("{v:.3}")
            }
        };
        let mut chart = ChartBuilder::on(root)
            .caption(title, (FAMILY, 24))
            .margin(12)
            .x_label_area_size(40)
            .y_label_area_size(70)
            .build_cartesian_2d(xr, yr)
            .map_err(err)?;
        chart
            .configure_mesh()
            .x_desc("step")
            .y_desc(if log { "loss (log scale)" } else { "loss" })
            .x_label_formatter(&|x| format!("{x:.0}"))
            .y_label_formatter(&label)
            .label_style((FAMILY, 14))
            .axis_desc_style((FAMILY, 16))
            .light_line_style(BLACK.mix(0.05))
            .draw()
            .map_err(err)?;
        chart
            .draw_series(LineSeries::new(
                pts.iter().copied(),
                RGBColor(158, 202, 225).stroke_width(1),
            ))
            .map_err(err)?;
        chart
            .draw_series(LineSeries::new(
                smooth.iter().copied(),
                RGBColor(8, 81, 156).stroke_width(2),
            ))
            .map_err(err)?;
        Ok(())
    })
}

/// One panel of [`trajectory_grid`]: a scene seen from above, positions in metres.
#[derive(Debug, Clone, Default)]
pub struct TrajectoryPanel {
    /// The panel's caption (e.g. the scene's speed and the true intent).
    pub title: String,
    /// The true future (black, thick).
    pub truth: Vec<(f64, f64)>,
    /// Sampled futures (blue, thin).
    pub samples: Vec<Vec<(f64, f64)>>,
    /// A deterministic prediction (red), if any.
    pub baseline: Option<Vec<(f64, f64)>>,
    /// Grey road lines (each a polyline) drawn underneath, e.g. a junction's stop line.
    pub road: Vec<Vec<(f64, f64)>>,
}

/// A grid of bird's-eye panels, `cols` per row, each with equal scales on both axes: the
/// car starts at the origin heading right; the truth is black, samples blue, the baseline
/// red, road lines grey. Non-finite points are left out.
///
/// ```
/// use flow_matching::plot::{trajectory_grid, TrajectoryPanel};
/// let line = |k: f64| (0..64).map(|i| (i as f64, k * (i as f64).powi(2) / 100.0)).collect();
/// let panel = TrajectoryPanel {
///     title: "scene".into(),
///     truth: line(0.0),
///     samples: vec![line(0.1), line(-0.1)],
///     baseline: Some(line(0.0)),
///     road: vec![],
/// };
/// let path = std::env::temp_dir().join(format!("fm-doc-traj-{}.png", std::process::id()));
/// trajectory_grid(&path, &[panel.clone(), panel], 2, "futures").unwrap();
/// # std::fs::remove_file(&path).unwrap();
/// ```
pub fn trajectory_grid(
    path: impl AsRef<Path>,
    panels: &[TrajectoryPanel],
    cols: usize,
    title: &str,
) -> Result<()> {
    let path = path.as_ref();
    if panels.is_empty() || cols == 0 {
        return Err(Error::invalid(
            "trajectory grid",
            format!("{} panels in {cols} columns", panels.len()),
            "at least one panel and one column",
        ));
    }
    let rows = panels.len().div_ceil(cols);
    const CELL: u32 = 260;
    let top = if title.is_empty() { 0 } else { 34 };
    let legend = 26;
    let (w, h) = (cols as u32 * CELL, top + legend + rows as u32 * CELL);
    let finite = |p: &(f64, f64)| p.0.is_finite() && p.1.is_finite();
    render(path, (w, h), |root| {
        let err = |e| plot_err(path, e);
        if !title.is_empty() {
            root.draw(&Text::new(
                title.to_string(),
                (10, 6),
                (FAMILY, 20).into_font().color(&BLACK),
            ))
            .map_err(err)?;
        }
        let keys = [
            ("truth", BLACK),
            ("flow-matching samples", GENERATED),
            ("regression baseline", RGBColor(214, 39, 40)),
        ];
        let mut x = 10;
        for (name, color) in keys {
            let y = top as i32 + 12;
            root.draw(&PathElement::new(
                [(x, y), (x + 24, y)],
                color.stroke_width(3),
            ))
            .map_err(err)?;
            root.draw(&Text::new(
                name,
                (x + 30, y - 8),
                (FAMILY, 14).into_font().color(&BLACK),
            ))
            .map_err(err)?;
            x += 40 + 8 * name.len() as i32;
        }
        let body = root.margin(top + legend, 0, 0, 0);
        let cells = body.split_evenly((rows, cols));
        for (cell, p) in cells.iter().zip(panels) {
            // A square view around everything drawn, so turns look like turns.
            let pts = p
                .truth
                .iter()
                .chain(p.samples.iter().flatten())
                .chain(p.baseline.iter().flatten())
                .chain(std::iter::once(&(0.0, 0.0)))
                .filter(|q| finite(q));
            let (mut lo, mut hi) = ((f64::MAX, f64::MAX), (f64::MIN, f64::MIN));
            for q in pts {
                lo = (lo.0.min(q.0), lo.1.min(q.1));
                hi = (hi.0.max(q.0), hi.1.max(q.1));
            }
            let half = 0.5 * (hi.0 - lo.0).max(hi.1 - lo.1).max(10.0) * 1.1;
            let c = (0.5 * (lo.0 + hi.0), 0.5 * (lo.1 + hi.1));
            let mut chart = ChartBuilder::on(cell)
                .caption(&p.title, (FAMILY, 13))
                .margin(6)
                .x_label_area_size(18)
                .y_label_area_size(28)
                .build_cartesian_2d((c.0 - half)..(c.0 + half), (c.1 - half)..(c.1 + half))
                .map_err(err)?;
            chart
                .configure_mesh()
                .light_line_style(WHITE.mix(0.0))
                .x_labels(4)
                .y_labels(4)
                .label_style((FAMILY, 10))
                .draw()
                .map_err(err)?;
            for r in &p.road {
                chart
                    .draw_series(LineSeries::new(
                        r.iter().copied().filter(finite),
                        RGBColor(170, 170, 170).stroke_width(2),
                    ))
                    .map_err(err)?;
            }
            for s in &p.samples {
                chart
                    .draw_series(LineSeries::new(
                        s.iter().copied().filter(finite),
                        GENERATED.mix(0.7).stroke_width(1),
                    ))
                    .map_err(err)?;
            }
            if let Some(b) = &p.baseline {
                chart
                    .draw_series(LineSeries::new(
                        b.iter().copied().filter(finite),
                        RGBColor(214, 39, 40).stroke_width(2),
                    ))
                    .map_err(err)?;
            }
            chart
                .draw_series(LineSeries::new(
                    p.truth.iter().copied().filter(finite),
                    BLACK.stroke_width(2),
                ))
                .map_err(err)?;
            chart
                .draw_series(std::iter::once(Circle::new((0.0, 0.0), 3, BLACK.filled())))
                .map_err(err)?;
        }
        Ok(())
    })
}

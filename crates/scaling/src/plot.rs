//! Plots (plotters, SVG and PNG) of fits, residuals and the frontier.
//!
//! Text is drawn with DejaVu Sans embedded in the binary (assets/, license
//! beside it), registered with plotters' ab_glyph backend, so no system font
//! or font configuration is needed.

use std::path::{Path, PathBuf};
use std::sync::Once;

use plotters::coord::Shift;
use plotters::prelude::*;

use crate::analysis::{params_from_vec, Analysis, SingleFitReport, XVar};
use crate::error::{Error, Result};
use crate::power_law::SingleLaw;

static FONT: &[u8] = include_bytes!("../assets/DejaVuSans.ttf");
static REGISTER: Once = Once::new();
const FAMILY: &str = "sans-serif";
const SIZE: (u32, u32) = (1000, 680);

fn register_font() {
    REGISTER.call_once(|| {
        // The embedded font is a valid TTF; failure would be a build defect.
        if plotters::style::register_font(FAMILY, FontStyle::Normal, FONT).is_err() {
            eprintln!("matscale-scaling: the embedded DejaVu Sans could not be registered");
        }
    });
}

const PALETTE: [RGBColor; 8] = [
    RGBColor(31, 119, 180),
    RGBColor(214, 39, 40),
    RGBColor(44, 160, 44),
    RGBColor(148, 103, 189),
    RGBColor(255, 127, 14),
    RGBColor(23, 190, 207),
    RGBColor(140, 86, 75),
    RGBColor(227, 119, 194),
];

fn color(i: usize) -> RGBColor {
    PALETTE[i % PALETTE.len()]
}

fn plot_err(path: &Path, e: impl std::fmt::Display) -> Error {
    Error::Plot {
        path: path.to_path_buf(),
        message: e.to_string(),
    }
}

/// Tick label: plain decimals (trailing zeros dropped) for moderate values,
/// `1e5` / `2e5` style beyond.
fn tick(v: f64) -> String {
    let a = v.abs();
    if v == 0.0 {
        "0".into()
    } else if (0.01..1e4).contains(&a) {
        let s = format!("{v:.3}");
        let s = s.trim_end_matches('0').trim_end_matches('.');
        s.to_string()
    } else {
        let e = a.log10().floor();
        let m = v / 10f64.powf(e);
        if (m - m.round()).abs() < 1e-6 {
            format!("{}e{}", m.round(), e as i32)
        } else {
            format!("{m:.1}e{}", e as i32)
        }
    }
}

/// Tick positions for a log axis over [lo, hi]: decades (with 2 and 5
/// between them when the range is short), or evenly spaced round values when
/// the range is within one decade, where decades alone would leave no tick.
fn log_ticks(lo: f64, hi: f64) -> Vec<f64> {
    let decades = (hi / lo).log10();
    if decades >= 1.5 {
        let mults: &[f64] = if decades < 3.0 {
            &[1.0, 2.0, 5.0]
        } else {
            &[1.0]
        };
        let step = if decades > 12.0 { 2 } else { 1 };
        let mut out = Vec::new();
        let mut e = lo.log10().floor() as i32;
        while 10f64.powi(e) <= hi {
            if (e.rem_euclid(step)) == 0 {
                for m in mults {
                    let v = m * 10f64.powi(e);
                    if v >= lo && v <= hi {
                        out.push(v);
                    }
                }
            }
            e += 1;
        }
        out
    } else {
        let raw = (hi - lo) / 6.0;
        let mag = 10f64.powf(raw.log10().floor());
        let step = [1.0, 2.0, 2.5, 5.0, 10.0]
            .iter()
            .map(|m| m * mag)
            .find(|s| *s >= raw)
            .unwrap_or(10.0 * mag);
        let mut v = (lo / step).ceil() * step;
        let mut out = Vec::new();
        while v <= hi {
            out.push(v);
            v += step;
        }
        out
    }
}

fn log_range(values: impl Iterator<Item = f64>, pad: f64) -> (f64, f64) {
    let (mut lo, mut hi) = (f64::INFINITY, f64::NEG_INFINITY);
    for v in values.filter(|v| v.is_finite() && *v > 0.0) {
        lo = lo.min(v);
        hi = hi.max(v);
    }
    if !lo.is_finite() {
        return (1.0, 10.0);
    }
    if hi <= lo {
        hi = lo * 2.0;
    }
    let span = (hi / lo).ln();
    (lo * (-pad * span).exp(), hi * (pad * span).exp())
}

/// Raises the top of a log range so that the upper `entries` legend lines
/// (about 24 px each in a plot area of about 560 px) sit above the data.
fn legend_headroom(lo: f64, hi: f64, entries: usize) -> f64 {
    let f = ((entries as f64 * 24.0 + 24.0) / 560.0).min(0.6);
    hi * (hi / lo).powf(f / (1.0 - f))
}

fn geomspace(lo: f64, hi: f64, n: usize) -> Vec<f64> {
    (0..n)
        .map(|i| lo * (hi / lo).powf(i as f64 / (n - 1) as f64))
        .collect()
}

/// The charts this module draws.
enum Chart {
    Single(XVar),
    Residuals(XVar),
    Frontier,
    Parity,
}

fn render<DB: DrawingBackend>(
    root: &DrawingArea<DB, Shift>,
    a: &Analysis,
    chart: &Chart,
) -> Result<(), String> {
    match chart {
        Chart::Single(x) => draw_single(root, a, *x),
        Chart::Residuals(x) => draw_residuals(root, a, *x),
        Chart::Frontier => draw_frontier(root, a, &a.runs),
        Chart::Parity => draw_parity(root, a),
    }
}

/// Draws one chart to both an SVG and a PNG file named `stem`, each written
/// under a temporary name (keeping the extension, from which plotters picks
/// the image format) and renamed when complete.
fn both(dir: &Path, stem: &str, out: &mut Vec<PathBuf>, a: &Analysis, chart: Chart) -> Result<()> {
    let tmp = |ext: &str| dir.join(format!(".{stem}.tmp{}.{ext}", std::process::id()));
    let svg = dir.join(format!("{stem}.svg"));
    let svg_tmp = tmp("svg");
    {
        let root = SVGBackend::new(&svg_tmp, SIZE).into_drawing_area();
        render(&root, a, &chart).map_err(|e| plot_err(&svg, e))?;
        root.present().map_err(|e| plot_err(&svg, e))?;
    }
    std::fs::rename(&svg_tmp, &svg).map_err(|e| Error::Io {
        path: svg.clone(),
        source: e,
    })?;
    out.push(svg);
    let png = dir.join(format!("{stem}.png"));
    let png_tmp = tmp("png");
    {
        let root = BitMapBackend::new(&png_tmp, SIZE).into_drawing_area();
        render(&root, a, &chart).map_err(|e| plot_err(&png, e))?;
        root.present().map_err(|e| plot_err(&png, e))?;
    }
    std::fs::rename(&png_tmp, &png).map_err(|e| Error::Io {
        path: png.clone(),
        source: e,
    })?;
    out.push(png);
    Ok(())
}

/// Bootstrap band of a single-variable fit over `grid`.
fn single_band(r: &SingleFitReport, grid: &[f64]) -> Option<Vec<(f64, f64, f64)>> {
    let b = r.bootstrap.as_ref()?;
    Some(
        grid.iter()
            .map(|&x| {
                let iv = b.interval_of_fn(|s| s[2] + s[0] * x.powf(-s[1]), r.fit.params.predict(x));
                (x, iv.lower, iv.upper)
            })
            .collect(),
    )
}

fn preferred(a: &Analysis, group: &str, x: XVar) -> SingleLaw {
    a.comparisons
        .iter()
        .find(|c| c.group == group && c.x == x)
        .map_or(SingleLaw::Power, |c| c.preferred)
}

/// The family list (a family's colour is its index here).
fn groups(a: &Analysis) -> Vec<String> {
    let mut g: Vec<String> = a.runs.iter().map(|r| r.0.clone()).collect();
    g.extend(a.single.iter().map(|r| r.group.clone()));
    g.extend(a.joint.iter().map(|j| j.group.clone()));
    g.sort();
    g.dedup();
    g
}

fn draw_single<DB: DrawingBackend>(
    root: &DrawingArea<DB, Shift>,
    a: &Analysis,
    x: XVar,
) -> Result<(), String> {
    root.fill(&WHITE).map_err(|e| e.to_string())?;
    let reports: Vec<&SingleFitReport> = a.single.iter().filter(|r| r.x == x).collect();
    let (x0, x1) = log_range(
        reports.iter().flat_map(|r| r.points.iter().map(|p| p.0)),
        0.06,
    );
    let (y0, y1) = log_range(
        reports.iter().flat_map(|r| r.points.iter().map(|p| p.1)),
        0.08,
    );
    let mut chart = ChartBuilder::on(root)
        .caption(
            format!("Validation loss vs {}", x.label(&a.data_unit)),
            (FAMILY, 26),
        )
        .margin(18)
        .x_label_area_size(60)
        .y_label_area_size(80)
        .build_cartesian_2d(
            (x0..x1).log_scale().with_key_points(log_ticks(x0, x1)),
            (y0..y1).log_scale().with_key_points(log_ticks(y0, y1)),
        )
        .map_err(|e| e.to_string())?;
    chart
        .configure_mesh()
        .x_desc(x.label(&a.data_unit))
        .y_desc("best validation loss")
        .label_style((FAMILY, 17))
        .axis_desc_style((FAMILY, 20))
        .x_label_formatter(&|v| tick(*v))
        .y_label_formatter(&|v| tick(*v))
        .light_line_style(WHITE.mix(0.0))
        .bold_line_style(BLACK.mix(0.08))
        .draw()
        .map_err(|e| e.to_string())?;
    let gs = groups(a);
    for (gi, g) in gs.iter().enumerate() {
        let c = color(gi);
        let mine: Vec<&&SingleFitReport> = reports.iter().filter(|r| &r.group == g).collect();
        let Some(first) = mine.first() else { continue };
        let pref = preferred(a, g, x);
        let grid = geomspace(x0, x1, 120);
        for r in &mine {
            let is_pref = r.fit.law == pref;
            if is_pref {
                if let Some(band) = single_band(r, &grid) {
                    let mut poly: Vec<(f64, f64)> =
                        band.iter().map(|b| (b.0, b.2.clamp(y0, y1))).collect();
                    poly.extend(band.iter().rev().map(|b| (b.0, b.1.clamp(y0, y1))));
                    chart
                        .draw_series(std::iter::once(Polygon::new(poly, c.mix(0.18).filled())))
                        .map_err(|e| e.to_string())?;
                }
            }
        }
        chart
            .draw_series(
                first
                    .points
                    .iter()
                    .map(|&(px, py)| Circle::new((px, py), 4, c.mix(0.75).filled())),
            )
            .map_err(|e| e.to_string())?
            .label(format!("{g}: runs"))
            .legend(move |(lx, ly)| Circle::new((lx + 10, ly), 4, c.filled()));
        for r in &mine {
            let p = r.fit.params;
            let curve: Vec<(f64, f64)> = grid
                .iter()
                .map(|&gx| (gx, p.predict(gx)))
                .filter(|&(_, gy)| gy >= y0 && gy <= y1)
                .collect();
            let label = match r.fit.law {
                SingleLaw::Power => format!("{g}: a·x^-b, b = {:.3}", p.b),
                SingleLaw::PowerWithOffset => {
                    format!("{g}: E + a·x^-b, b = {:.3}, E = {:.3}", p.b, p.e)
                }
            };
            if r.fit.law == pref {
                chart
                    .draw_series(LineSeries::new(curve, c.stroke_width(3)))
                    .map_err(|e| e.to_string())?
                    .label(format!("{label} (preferred)"))
                    .legend(move |(lx, ly)| {
                        PathElement::new(vec![(lx, ly), (lx + 20, ly)], c.stroke_width(3))
                    });
            } else {
                chart
                    .draw_series(DashedLineSeries::new(curve, 8, 6, c.stroke_width(2)))
                    .map_err(|e| e.to_string())?
                    .label(label)
                    .legend(move |(lx, ly)| {
                        PathElement::new(vec![(lx, ly), (lx + 8, ly)], c.stroke_width(2))
                    });
            }
        }
    }
    draw_legend(&mut chart, SeriesLabelPosition::UpperRight)
}

fn draw_residuals<DB: DrawingBackend>(
    root: &DrawingArea<DB, Shift>,
    a: &Analysis,
    x: XVar,
) -> Result<(), String> {
    root.fill(&WHITE).map_err(|e| e.to_string())?;
    let gs = groups(a);
    let chosen: Vec<&SingleFitReport> = a
        .single
        .iter()
        .filter(|r| r.x == x && r.fit.law == preferred(a, &r.group, x))
        .collect();
    let res: Vec<(usize, f64, f64)> = chosen
        .iter()
        .flat_map(|r| {
            let gi = gs.iter().position(|g| g == &r.group).unwrap_or(0);
            r.points
                .iter()
                .map(move |&(px, py)| (gi, px, (py / r.fit.params.predict(px)).ln()))
        })
        .collect();
    let (x0, x1) = log_range(res.iter().map(|r| r.1), 0.06);
    let m = res.iter().map(|r| r.2.abs()).fold(0.0, f64::max).max(1e-3) * 1.15;
    let n_groups = res
        .iter()
        .map(|r| r.0)
        .collect::<std::collections::BTreeSet<_>>()
        .len();
    let top = m * (1.0 + 2.0 * ((n_groups as f64 * 24.0 + 24.0) / 560.0).min(0.6));
    let mut chart = ChartBuilder::on(root)
        .caption(
            format!(
                "Residuals of the preferred law vs {}",
                x.label(&a.data_unit)
            ),
            (FAMILY, 26),
        )
        .margin(18)
        .x_label_area_size(60)
        .y_label_area_size(80)
        .build_cartesian_2d(
            (x0..x1).log_scale().with_key_points(log_ticks(x0, x1)),
            -m..top,
        )
        .map_err(|e| e.to_string())?;
    chart
        .configure_mesh()
        .x_desc(x.label(&a.data_unit))
        .y_desc("ln(observed / fitted loss)")
        .label_style((FAMILY, 17))
        .axis_desc_style((FAMILY, 20))
        .x_label_formatter(&|v| tick(*v))
        .y_label_formatter(&|v| {
            if v.abs() < 1e-12 {
                "0".into()
            } else {
                format!("{v:+.3}")
            }
        })
        .light_line_style(WHITE.mix(0.0))
        .bold_line_style(BLACK.mix(0.08))
        .draw()
        .map_err(|e| e.to_string())?;
    chart
        .draw_series(LineSeries::new(
            vec![(x0, 0.0), (x1, 0.0)],
            BLACK.mix(0.6).stroke_width(1),
        ))
        .map_err(|e| e.to_string())?;
    for (gi, g) in gs.iter().enumerate() {
        let c = color(gi);
        let pts: Vec<(f64, f64)> = res
            .iter()
            .filter(|r| r.0 == gi)
            .map(|r| (r.1, r.2))
            .collect();
        if pts.is_empty() {
            continue;
        }
        let law = preferred(a, g, x).formula();
        chart
            .draw_series(
                pts.into_iter()
                    .map(|p| Circle::new(p, 4, c.mix(0.75).filled())),
            )
            .map_err(|e| e.to_string())?
            .label(format!("{g} ({law})"))
            .legend(move |(lx, ly)| Circle::new((lx + 10, ly), 4, c.filled()));
    }
    draw_legend(&mut chart, SeriesLabelPosition::UpperRight)
}

/// All runs' loss vs compute, the empirical envelope, and the joint fit's
/// compute-optimal loss with its bootstrap band.
fn draw_frontier<DB: DrawingBackend>(
    root: &DrawingArea<DB, Shift>,
    a: &Analysis,
    runs: &[(String, f64, f64)],
) -> Result<(), String> {
    root.fill(&WHITE).map_err(|e| e.to_string())?;
    let (x0, x1) = log_range(runs.iter().map(|r| r.1), 0.06);
    let (y0, y1) = log_range(runs.iter().map(|r| r.2), 0.08);
    let n_families = runs
        .iter()
        .map(|r| &r.0)
        .collect::<std::collections::BTreeSet<_>>()
        .len();
    let y1 = legend_headroom(y0, y1, n_families + 1 + a.joint.len());
    let mut chart = ChartBuilder::on(root)
        .caption("Compute-optimal frontier", (FAMILY, 26))
        .margin(18)
        .x_label_area_size(60)
        .y_label_area_size(80)
        .build_cartesian_2d(
            (x0..x1).log_scale().with_key_points(log_ticks(x0, x1)),
            (y0..y1).log_scale().with_key_points(log_ticks(y0, y1)),
        )
        .map_err(|e| e.to_string())?;
    chart
        .configure_mesh()
        .x_desc("training compute C (FLOP)")
        .y_desc("best validation loss")
        .label_style((FAMILY, 17))
        .axis_desc_style((FAMILY, 20))
        .x_label_formatter(&|v| tick(*v))
        .y_label_formatter(&|v| tick(*v))
        .light_line_style(WHITE.mix(0.0))
        .bold_line_style(BLACK.mix(0.08))
        .draw()
        .map_err(|e| e.to_string())?;
    let gs = groups(a);
    let mut families: Vec<&String> = runs.iter().map(|r| &r.0).collect();
    families.sort();
    families.dedup();
    for f in families {
        let gi = gs.iter().position(|g| g == f).unwrap_or(0);
        let c = color(gi);
        chart
            .draw_series(
                runs.iter()
                    .filter(|r| &r.0 == f)
                    .map(|r| Circle::new((r.1, r.2), 3, c.mix(0.35).filled())),
            )
            .map_err(|e| e.to_string())?
            .label(format!("{f}: runs"))
            .legend(move |(lx, ly)| Circle::new((lx + 10, ly), 3, c.mix(0.5).filled()));
    }
    // Empirical envelope as a staircase.
    let mut stairs = Vec::new();
    for (i, p) in a.frontier.iter().enumerate() {
        if i > 0 {
            stairs.push((p.flops, a.frontier[i - 1].loss));
        }
        stairs.push((p.flops, p.loss));
    }
    if let Some(last) = a.frontier.last() {
        stairs.push((x1, last.loss));
    }
    chart
        .draw_series(LineSeries::new(stairs, BLACK.stroke_width(2)))
        .map_err(|e| e.to_string())?
        .label("lower envelope of runs")
        .legend(|(lx, ly)| PathElement::new(vec![(lx, ly), (lx + 20, ly)], BLACK.stroke_width(2)));
    chart
        .draw_series(
            a.frontier
                .iter()
                .map(|p| Circle::new((p.flops, p.loss), 5, BLACK.filled())),
        )
        .map_err(|e| e.to_string())?;
    for j in &a.joint {
        let gi = gs.iter().position(|g| g == &j.group).unwrap_or(0);
        let c = color(gi);
        let grid = geomspace(x0, x1, 120);
        let opt = |p: &crate::chinchilla::JointParams, cc: f64| {
            p.optimal_allocation(cc, j.k)
                .map_or(f64::NAN, |(n, d)| p.predict(n, d))
        };
        if let Some(b) = &j.bootstrap {
            let band: Vec<(f64, f64, f64)> = grid
                .iter()
                .map(|&cc| {
                    let iv =
                        b.interval_of_fn(|s| opt(&params_from_vec(s), cc), opt(&j.fit.params, cc));
                    (cc, iv.lower.clamp(y0, y1), iv.upper.clamp(y0, y1))
                })
                .filter(|t| t.1.is_finite() && t.2.is_finite())
                .collect();
            let mut poly: Vec<(f64, f64)> = band.iter().map(|t| (t.0, t.2)).collect();
            poly.extend(band.iter().rev().map(|t| (t.0, t.1)));
            chart
                .draw_series(std::iter::once(Polygon::new(poly, c.mix(0.2).filled())))
                .map_err(|e| e.to_string())?;
        }
        let curve: Vec<(f64, f64)> = grid
            .iter()
            .map(|&cc| (cc, opt(&j.fit.params, cc)))
            .filter(|t| t.1.is_finite() && t.1 >= y0 && t.1 <= y1)
            .collect();
        let (ea, eb) = j.fit.params.allocation_exponents();
        chart
            .draw_series(LineSeries::new(curve, c.stroke_width(3)))
            .map_err(|e| e.to_string())?
            .label(format!(
                "{}: joint-fit optimum, N ∝ C^{ea:.3}, D ∝ C^{eb:.3} (k = {})",
                j.group,
                crate::report::fmt_num(j.k)
            ))
            .legend(move |(lx, ly)| {
                PathElement::new(vec![(lx, ly), (lx + 20, ly)], c.stroke_width(3))
            });
    }
    draw_legend(&mut chart, SeriesLabelPosition::UpperRight)
}

/// The legend box every plot uses, at `position`.
fn draw_legend<'a, DB: DrawingBackend + 'a, CT: CoordTranslate>(
    chart: &mut ChartContext<'a, DB, CT>,
    position: SeriesLabelPosition,
) -> Result<(), String> {
    chart
        .configure_series_labels()
        .position(position)
        .label_font((FAMILY, 16))
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK.mix(0.4))
        .draw()
        .map_err(|e| e.to_string())
}

/// Observed vs fitted loss of the joint law.
fn draw_parity<DB: DrawingBackend>(
    root: &DrawingArea<DB, Shift>,
    a: &Analysis,
) -> Result<(), String> {
    root.fill(&WHITE).map_err(|e| e.to_string())?;
    let pts: Vec<(usize, f64, f64)> = a
        .joint
        .iter()
        .enumerate()
        .flat_map(|(ji, j)| {
            j.points
                .iter()
                .map(move |p| (ji, j.fit.params.predict(p[0], p[1]), p[3]))
        })
        .collect();
    let (lo, hi) = log_range(pts.iter().flat_map(|p| [p.1, p.2]), 0.05);
    let mut chart = ChartBuilder::on(root)
        .caption(
            "Joint law L(N, D) = E + A/N^α + B/D^β: observed vs fitted",
            (FAMILY, 26),
        )
        .margin(18)
        .x_label_area_size(60)
        .y_label_area_size(80)
        .build_cartesian_2d(
            (lo..hi).log_scale().with_key_points(log_ticks(lo, hi)),
            (lo..hi).log_scale().with_key_points(log_ticks(lo, hi)),
        )
        .map_err(|e| e.to_string())?;
    chart
        .configure_mesh()
        .x_desc("fitted loss L(N, D)")
        .y_desc("observed best validation loss")
        .label_style((FAMILY, 17))
        .axis_desc_style((FAMILY, 20))
        .x_label_formatter(&|v| tick(*v))
        .y_label_formatter(&|v| tick(*v))
        .light_line_style(WHITE.mix(0.0))
        .bold_line_style(BLACK.mix(0.08))
        .draw()
        .map_err(|e| e.to_string())?;
    chart
        .draw_series(LineSeries::new(
            vec![(lo, lo), (hi, hi)],
            BLACK.mix(0.6).stroke_width(1),
        ))
        .map_err(|e| e.to_string())?
        .label("observed = fitted")
        .legend(|(lx, ly)| PathElement::new(vec![(lx, ly), (lx + 20, ly)], BLACK.mix(0.6)));
    let gs = groups(a);
    for (ji, j) in a.joint.iter().enumerate() {
        let c = color(gs.iter().position(|g| g == &j.group).unwrap_or(0));
        chart
            .draw_series(
                pts.iter()
                    .filter(|p| p.0 == ji)
                    .map(|p| Circle::new((p.1, p.2), 4, c.mix(0.6).filled())),
            )
            .map_err(|e| e.to_string())?
            .label(format!(
                "{} ({} runs, RMS log residual {:.4})",
                j.group, j.fit.n_points, j.criteria.rms_log_residual
            ))
            .legend(move |(lx, ly)| Circle::new((lx + 10, ly), 4, c.filled()));
    }
    draw_legend(&mut chart, SeriesLabelPosition::UpperLeft)
}

/// Writes every plot of the analysis into `dir`; returns the files.
pub fn write_plots(a: &Analysis, dir: &Path) -> Result<Vec<PathBuf>> {
    register_font();
    let mut out = Vec::new();
    let mut xs: Vec<XVar> = a.single.iter().map(|r| r.x).collect();
    xs.dedup();
    for x in xs {
        both(
            dir,
            &format!("loss_vs_{}", x.name()),
            &mut out,
            a,
            Chart::Single(x),
        )?;
        both(
            dir,
            &format!("residuals_{}", x.name()),
            &mut out,
            a,
            Chart::Residuals(x),
        )?;
    }
    if !a.runs.is_empty() {
        both(dir, "frontier", &mut out, a, Chart::Frontier)?;
    }
    if !a.joint.is_empty() {
        both(dir, "joint_parity", &mut out, a, Chart::Parity)?;
    }
    Ok(out)
}

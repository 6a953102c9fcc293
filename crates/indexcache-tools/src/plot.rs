//! Heatmaps and line plots, each written as `<stem>.png` and `<stem>.svg`.
//!
//! Drawing uses `plotters` without its default features: the bitmap backend (PNG through the
//! `image` crate), the SVG backend, and `ab_glyph` for text. `ab_glyph` never looks for system
//! fonts (no fontconfig, no freetype): the PNG's glyphs are rasterised from DejaVu Sans, which the
//! `dejavu` crate embeds in the binary, so plots render the same on a bare CI machine. The SVG
//! keeps its text as `<text font-family="sans-serif">` for the viewer to render (sizes are
//! measured with the same embedded font).

use crate::error::ToolError;
use plotters::coord::Shift;
use plotters::prelude::*;
use plotters::style::FontStyle;
use plotters::style::text_anchor::{HPos, Pos, VPos};
use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

const FONT: &str = "sans-serif";
const HEATMAP_SIZE: (u32, u32) = (960, 800);
const LINE_SIZE: (u32, u32) = (1000, 600);
/// Cells get their value written in them up to this many rows/columns.
const ANNOTATE_MAX: usize = 12;
/// Largest heatmap side.
const MAX_CELLS: usize = 4096;
/// At most this many tick labels per heatmap axis.
const MAX_TICKS: usize = 24;

/// `matrix` (rows × columns, row 0 at the top) as a heatmap with a colour bar. Axes are labelled
/// "layer". The colour scale is `[0, 1]` when every finite value lies there (overlaps and other
/// fractions stay comparable across plots), else the data's range; non-finite cells are grey.
/// Writes `<path_stem>.png` and `<path_stem>.svg`, creating the parent directory.
pub fn heatmap(matrix: &[Vec<f64>], title: &str, path_stem: &Path) -> Result<(), ToolError> {
    let rows = matrix.len();
    let cols = matrix.first().map_or(0, Vec::len);
    if rows == 0 || cols == 0 {
        return Err(ToolError::Invalid(format!("heatmap {title:?}: the matrix is empty")));
    }
    if let Some((i, r)) = matrix.iter().enumerate().find(|(_, r)| r.len() != cols) {
        return Err(ToolError::Invalid(format!(
            "heatmap {title:?}: row {i} has {} values but row 0 has {cols}",
            r.len()
        )));
    }
    if rows > MAX_CELLS || cols > MAX_CELLS {
        return Err(ToolError::Invalid(format!(
            "heatmap {title:?}: {rows}×{cols} is too large to plot (at most {MAX_CELLS} per side)"
        )));
    }
    let finite = matrix.iter().flatten().copied().filter(|v| v.is_finite());
    let (lo, hi) = finite.fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), v| (a.min(v), b.max(v)));
    if lo > hi {
        return Err(ToolError::Invalid(format!("heatmap {title:?}: no finite value to plot")));
    }
    let scale = if lo >= 0.0 && hi <= 1.0 { (0.0, 1.0) } else { widen(lo, hi) };
    let h = Heatmap { matrix, rows, cols, title, scale };
    let (png, svg) = outputs(path_stem)?;
    h.draw(BitMapBackend::new(&png, HEATMAP_SIZE).into_drawing_area()).map_err(|e| ToolError::file(&png, e))?;
    h.draw(SVGBackend::new(&svg, HEATMAP_SIZE).into_drawing_area()).map_err(|e| ToolError::file(&svg, e))
}

/// One line per `(name, points)` series, with markers and a legend (series with an empty name
/// are left out of it). Non-finite points are skipped. Writes `<path_stem>.png` and
/// `<path_stem>.svg`, creating the parent directory.
pub fn line_plot(
    series: &[(String, Vec<(f64, f64)>)],
    title: &str,
    x_label: &str,
    y_label: &str,
    path_stem: &Path,
) -> Result<(), ToolError> {
    let finite = |&(x, y): &(f64, f64)| x.is_finite() && y.is_finite();
    let clean: Vec<(&str, Vec<(f64, f64)>)> =
        series.iter().map(|(name, pts)| (name.as_str(), pts.iter().copied().filter(finite).collect())).collect();
    let all = || clean.iter().flat_map(|(_, p)| p.iter());
    let bounds = |f: fn(&(f64, f64)) -> f64| {
        all().map(f).fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), v| (a.min(v), b.max(v)))
    };
    let ((x0, x1), (y0, y1)) = (bounds(|p| p.0), bounds(|p| p.1));
    if x0 > x1 {
        return Err(ToolError::Invalid(format!("line plot {title:?}: no finite point to plot")));
    }
    let (x0, x1) = widen(x0, x1);
    let pad = (y1 - y0) * 0.05;
    let (y0, y1) = widen(y0 - pad, y1 + pad);
    let p = LinePlot { series: &clean, title, x_label, y_label, x: (x0, x1), y: (y0, y1) };
    let (png, svg) = outputs(path_stem)?;
    p.draw(BitMapBackend::new(&png, LINE_SIZE).into_drawing_area()).map_err(|e| ToolError::file(&png, e))?;
    p.draw(SVGBackend::new(&svg, LINE_SIZE).into_drawing_area()).map_err(|e| ToolError::file(&svg, e))
}

type DrawResult<DB> = Result<(), DrawingAreaErrorKind<<DB as DrawingBackend>::ErrorType>>;

struct Heatmap<'a> {
    matrix: &'a [Vec<f64>],
    rows: usize,
    cols: usize,
    title: &'a str,
    scale: (f64, f64),
}

impl Heatmap<'_> {
    fn draw<DB: DrawingBackend>(&self, root: DrawingArea<DB, Shift>) -> DrawResult<DB> {
        root.fill(&WHITE)?;
        let root = root.titled(self.title, (FONT, 26))?;
        let (w, _) = root.dim_in_pixel();
        let (main, bar) = root.split_horizontally(w.saturating_sub(130));
        // Cell (i, j) spans [2j, 2j + 2] × [2i, 2i + 2] so that integer key points can sit at
        // cell centres (float axes with custom key points have no label formatter in plotters).
        let (rows, cols) = (2 * self.rows as i32, 2 * self.cols as i32);
        let mut chart =
            ChartBuilder::on(&main).margin(15).x_label_area_size(45).y_label_area_size(55).build_cartesian_2d(
                (0..cols).with_key_points(centres(self.cols)),
                (rows..0).with_key_points(centres(self.rows)),
            )?;
        chart
            .configure_mesh()
            .disable_mesh()
            .x_desc("layer")
            .y_desc("layer")
            .x_label_formatter(&|v| format!("{}", v / 2))
            .y_label_formatter(&|v| format!("{}", v / 2))
            .label_style((FONT, 15))
            .axis_desc_style((FONT, 18))
            .draw()?;
        let (lo, hi) = self.scale;
        let cells = || {
            self.matrix
                .iter()
                .enumerate()
                .flat_map(|(i, row)| row.iter().enumerate().map(move |(j, &v)| (2 * j as i32, 2 * i as i32, v)))
        };
        chart.draw_series(
            cells().map(|(x, y, v)| Rectangle::new([(x, y), (x + 2, y + 2)], colour(v, lo, hi).filled())),
        )?;
        if self.rows <= ANNOTATE_MAX && self.cols <= ANNOTATE_MAX {
            let (w, h) = chart.plotting_area().dim_in_pixel();
            let cell = (w as f64 / self.cols as f64).min(h as f64 / self.rows as f64);
            let size = (cell / 4.0).clamp(9.0, 18.0);
            let style = |v: f64| {
                let t = if hi > lo { (v - lo) / (hi - lo) } else { 0.5 };
                let c: &'static RGBColor = if t > 0.6 { &BLACK } else { &WHITE };
                TextStyle::from((FONT, size).into_font()).color(c).pos(Pos::new(HPos::Center, VPos::Center))
            };
            chart.draw_series(
                cells()
                    .filter(|c| c.2.is_finite())
                    .map(|(x, y, v)| Text::new(format!("{v:.2}"), (x + 1, y + 1), style(v))),
            )?;
        }
        self.colour_bar(&bar)
    }

    fn colour_bar<DB: DrawingBackend>(&self, area: &DrawingArea<DB, Shift>) -> DrawResult<DB> {
        let (lo, hi) = self.scale;
        let mut chart = ChartBuilder::on(area)
            .margin_top(15)
            .margin_bottom(60)
            .margin_left(15)
            .margin_right(5)
            .right_y_label_area_size(55)
            .build_cartesian_2d(0.0..1.0, lo..hi)?;
        chart
            .configure_mesh()
            .disable_mesh()
            .disable_x_axis()
            .y_labels(6)
            .y_label_formatter(&|v| format!("{v:.2}"))
            .label_style((FONT, 14))
            .draw()?;
        const STEPS: usize = 100;
        let step = (hi - lo) / STEPS as f64;
        chart.draw_series((0..STEPS).map(|s| {
            let v = lo + step * s as f64;
            Rectangle::new([(0.0, v), (1.0, v + step)], colour(v + step / 2.0, lo, hi).filled())
        }))?;
        Ok(())
    }
}

struct LinePlot<'a> {
    series: &'a [(&'a str, Vec<(f64, f64)>)],
    title: &'a str,
    x_label: &'a str,
    y_label: &'a str,
    x: (f64, f64),
    y: (f64, f64),
}

impl LinePlot<'_> {
    fn draw<DB: DrawingBackend>(&self, root: DrawingArea<DB, Shift>) -> DrawResult<DB> {
        root.fill(&WHITE)?;
        let mut chart = ChartBuilder::on(&root)
            .caption(self.title, (FONT, 26))
            .margin(15)
            .x_label_area_size(50)
            .y_label_area_size(75)
            .build_cartesian_2d(self.x.0..self.x.1, self.y.0..self.y.1)?;
        let x_int = |v: &f64| format!("{v:.0}");
        let mut mesh = chart.configure_mesh();
        // Integer x values (layers, steps) get integer ticks, at most 12.
        if self.series.iter().flat_map(|(_, p)| p).all(|p| p.0.fract() == 0.0) {
            mesh.x_labels(((self.x.1 - self.x.0) as usize + 1).clamp(2, 12)).x_label_formatter(&x_int);
        }
        mesh.x_desc(self.x_label)
            .y_desc(self.y_label)
            .label_style((FONT, 15))
            .axis_desc_style((FONT, 18))
            .light_line_style(RGBColor(235, 235, 235))
            .draw()?;
        let mut labelled = false;
        for (idx, (name, pts)) in self.series.iter().enumerate() {
            let c = Palette99::pick(idx).to_rgba();
            let s = chart.draw_series(LineSeries::new(pts.iter().copied(), c.stroke_width(2)).point_size(3))?;
            if !name.is_empty() {
                labelled = true;
                s.label(*name).legend(move |(x, y)| PathElement::new([(x, y), (x + 20, y)], c.stroke_width(2)));
            }
        }
        if labelled {
            chart
                .configure_series_labels()
                .label_font((FONT, 15))
                .background_style(WHITE.mix(0.85))
                .border_style(BLACK)
                .position(SeriesLabelPosition::UpperRight)
                .draw()?;
        }
        Ok(())
    }
}

/// Registers the embedded font with plotters (once per process).
fn ensure_font() -> Result<(), ToolError> {
    static REGISTERED: OnceLock<bool> = OnceLock::new();
    let ok = *REGISTERED
        .get_or_init(|| plotters::style::register_font(FONT, FontStyle::Normal, dejavu::sans::regular()).is_ok());
    if ok { Ok(()) } else { Err(ToolError::Invalid("the embedded DejaVu Sans font could not be parsed".into())) }
}

/// `<stem>.png`, `<stem>.svg` (appended, so a stem may contain dots), with the parent directory
/// created and the font registered.
fn outputs(stem: &Path) -> Result<(PathBuf, PathBuf), ToolError> {
    ensure_font()?;
    if stem.file_name().is_none() {
        return Err(ToolError::file(stem, "plot path needs a file name (the stem of <stem>.png / <stem>.svg)"));
    }
    if let Some(dir) = stem.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).map_err(|e| ToolError::file(dir, e))?;
    }
    let with = |ext: &str| {
        let mut s = OsString::from(stem.as_os_str());
        s.push(ext);
        PathBuf::from(s)
    };
    Ok((with(".png"), with(".svg")))
}

/// Tick positions (doubled coordinates) at the centres of every few cells, at most
/// [`MAX_TICKS`].
fn centres(n: usize) -> Vec<i32> {
    let step = n.div_ceil(MAX_TICKS).max(1);
    (0..n).step_by(step).map(|c| 2 * c as i32 + 1).collect()
}

/// A non-empty range around `[lo, hi]`.
fn widen(lo: f64, hi: f64) -> (f64, f64) {
    if hi > lo {
        (lo, hi)
    } else {
        let d = if lo == 0.0 { 0.5 } else { lo.abs() * 0.05 };
        (lo - d, hi + d)
    }
}

/// Viridis, linearly interpolated between 9 anchors; grey for non-finite values.
fn colour(v: f64, lo: f64, hi: f64) -> RGBColor {
    const VIRIDIS: [(u8, u8, u8); 9] = [
        (68, 1, 84),
        (71, 44, 122),
        (59, 81, 139),
        (44, 113, 142),
        (33, 144, 141),
        (39, 173, 129),
        (92, 200, 99),
        (170, 220, 50),
        (253, 231, 37),
    ];
    if !v.is_finite() {
        return RGBColor(190, 190, 190);
    }
    let t = if hi > lo { ((v - lo) / (hi - lo)).clamp(0.0, 1.0) } else { 0.5 };
    let x = t * (VIRIDIS.len() - 1) as f64;
    let i = (x.floor() as usize).min(VIRIDIS.len() - 2);
    let f = x - i as f64;
    let (a, b) = (VIRIDIS[i], VIRIDIS[i + 1]);
    let mix = |p: u8, q: u8| (p as f64 + (q as f64 - p as f64) * f).round() as u8;
    RGBColor(mix(a.0, b.0), mix(a.1, b.1), mix(a.2, b.2))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn colour_ends_and_nan() {
        assert_eq!(colour(0.0, 0.0, 1.0), RGBColor(68, 1, 84));
        assert_eq!(colour(1.0, 0.0, 1.0), RGBColor(253, 231, 37));
        assert_eq!(colour(7.0, 0.0, 1.0), RGBColor(253, 231, 37));
        assert_eq!(colour(f64::NAN, 0.0, 1.0), RGBColor(190, 190, 190));
    }

    #[test]
    fn ticks_are_capped() {
        assert_eq!(centres(3), vec![1, 3, 5]);
        assert!(centres(78).len() <= MAX_TICKS);
    }

    #[test]
    fn stems_keep_dots() {
        let d = tempfile::tempdir().unwrap();
        let (png, svg) = outputs(&d.path().join("a/overlap.v1")).unwrap();
        assert!(png.ends_with("a/overlap.v1.png") && svg.ends_with("a/overlap.v1.svg"));
        assert!(d.path().join("a").is_dir());
    }
}

//! Shared PNG plotting helpers: line/point charts with one or more named series (plotters, bitmap
//! backend, the shipped DejaVu Sans font so no system font is needed).

use plotters::prelude::*;
use plotters::style::FontStyle;
use std::path::Path;
use std::sync::OnceLock;

static FONT: &[u8] = include_bytes!("../assets/fonts/DejaVuSans.ttf");
const FAMILY: &str = "sans-serif";

#[derive(Debug, thiserror::Error, Clone)]
pub enum PlotError {
    #[error("the shipped font could not be loaded")]
    Font,
    #[error("drawing {path} failed: {message}")]
    Draw { path: String, message: String },
}

fn init_font() -> Result<(), PlotError> {
    static DONE: OnceLock<bool> = OnceLock::new();
    let ok = *DONE
        .get_or_init(|| plotters::style::register_font(FAMILY, FontStyle::Normal, FONT).is_ok());
    ok.then_some(()).ok_or(PlotError::Font)
}

/// How a series is drawn.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mark {
    Line,
    Points,
    LinePoints,
}

/// One named series of (x, y) points.
#[derive(Debug, Clone, PartialEq)]
pub struct Series {
    pub name: String,
    pub points: Vec<(f64, f64)>,
}

impl Series {
    pub fn new(name: impl Into<String>, points: Vec<(f64, f64)>) -> Self {
        Self {
            name: name.into(),
            points,
        }
    }
}

/// A chart's title and axis labels.
#[derive(Debug, Clone)]
pub struct Chart<'a> {
    pub title: &'a str,
    pub x_label: &'a str,
    pub y_label: &'a str,
    pub mark: Mark,
    /// Start the y axis at 0 (latencies, throughputs, usage).
    pub y_from_zero: bool,
}

fn range(values: impl Iterator<Item = f64>, from_zero: bool) -> (f64, f64) {
    let (mut lo, mut hi) = values
        .filter(|v| v.is_finite())
        .fold((f64::INFINITY, f64::NEG_INFINITY), |(l, h), v| {
            (l.min(v), h.max(v))
        });
    if !lo.is_finite() {
        return (0.0, 1.0);
    }
    if from_zero {
        lo = lo.min(0.0);
    }
    if hi - lo < 1e-12 {
        hi = lo + 1.0;
    }
    let pad = (hi - lo) * 0.05;
    (if from_zero && lo >= 0.0 { lo } else { lo - pad }, hi + pad)
}

/// Draws `series` into a `width` x `height` PNG at `path`.
pub fn draw(
    path: &Path,
    chart: &Chart,
    series: &[Series],
    size: (u32, u32),
) -> Result<(), PlotError> {
    init_font()?;
    let err = |e: &dyn std::fmt::Display| PlotError::Draw {
        path: path.display().to_string(),
        message: e.to_string(),
    };
    let all = || series.iter().flat_map(|s| s.points.iter());
    let (x0, x1) = range(all().map(|p| p.0), false);
    let (y0, y1) = range(all().map(|p| p.1), chart.y_from_zero);
    let root = BitMapBackend::new(path, size).into_drawing_area();
    root.fill(&WHITE).map_err(|e| err(&e))?;
    let mut ctx = ChartBuilder::on(&root)
        .caption(chart.title, (FAMILY, 22))
        .margin(15)
        .x_label_area_size(45)
        .y_label_area_size(70)
        .build_cartesian_2d(x0..x1, y0..y1)
        .map_err(|e| err(&e))?;
    ctx.configure_mesh()
        .x_desc(chart.x_label)
        .y_desc(chart.y_label)
        .label_style((FAMILY, 14))
        .draw()
        .map_err(|e| err(&e))?;
    for (i, s) in series.iter().enumerate() {
        let color = Palette99::pick(i).to_rgba();
        let pts: Vec<(f64, f64)> = s
            .points
            .iter()
            .copied()
            .filter(|p| p.0.is_finite() && p.1.is_finite())
            .collect();
        let legend = move |(x, y): (i32, i32)| {
            PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(3))
        };
        if matches!(chart.mark, Mark::Line | Mark::LinePoints) {
            ctx.draw_series(LineSeries::new(pts.clone(), color.stroke_width(2)))
                .map_err(|e| err(&e))?
                .label(s.name.as_str())
                .legend(legend);
        }
        if matches!(chart.mark, Mark::Points | Mark::LinePoints) {
            let dots = ctx
                .draw_series(pts.iter().map(|&p| Circle::new(p, 3, color.filled())))
                .map_err(|e| err(&e))?;
            if chart.mark == Mark::Points {
                dots.label(s.name.as_str()).legend(legend);
            }
        }
    }
    if series.len() > 1 || series.iter().any(|s| !s.name.is_empty()) {
        ctx.configure_series_labels()
            .label_font((FAMILY, 14))
            .background_style(WHITE.mix(0.85))
            .border_style(BLACK)
            .draw()
            .map_err(|e| err(&e))?;
    }
    root.present().map_err(|e| err(&e))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn writes_a_png() {
        let dir = std::env::temp_dir().join(format!("probe-plot-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join("t.png");
        let chart = Chart {
            title: "test",
            x_label: "x",
            y_label: "y",
            mark: Mark::LinePoints,
            y_from_zero: true,
        };
        let s = vec![
            Series::new("a", (0..20).map(|i| (i as f64, (i * i) as f64)).collect()),
            Series::new("b", vec![]),
        ];
        draw(&p, &chart, &s, (640, 400)).unwrap();
        let bytes = std::fs::read(&p).unwrap();
        assert!(bytes.len() > 1000);
        assert_eq!(&bytes[..8], b"\x89PNG\r\n\x1a\n");
        std::fs::remove_dir_all(&dir).ok();
    }

    #[test]
    fn ranges_handle_empty_and_flat_data() {
        assert_eq!(range(std::iter::empty(), true), (0.0, 1.0));
        let (lo, hi) = range([5.0, 5.0].into_iter(), false);
        assert!(lo < 5.0 && hi > 5.0);
        let (lo, _) = range([2.0, 4.0].into_iter(), true);
        assert_eq!(lo, 0.0);
    }
}

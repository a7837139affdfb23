//! The demo's `report.html`: the figures of `report.json` as SVG charts
//! (drawn with plotters), in one self-contained page.

use plotters::prelude::*;

/// One named series of (x, y) points.
pub struct Series<'a> {
    pub name: &'a str,
    pub points: Vec<(f64, f64)>,
}

const COLORS: [RGBColor; 4] = [
    RGBColor(31, 119, 180),
    RGBColor(255, 127, 14),
    RGBColor(44, 160, 44),
    RGBColor(214, 39, 40),
];

/// A line chart with markers, as an SVG string.
pub fn line_chart(
    title: &str,
    x_label: &str,
    y_label: &str,
    series: &[Series<'_>],
) -> anyhow::Result<String> {
    let all: Vec<(f64, f64)> = series
        .iter()
        .flat_map(|s| s.points.iter().copied())
        .collect();
    let (x_min, x_max) = bounds(all.iter().map(|p| p.0));
    let (y_min, y_max) = bounds(all.iter().map(|p| p.1));
    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, (640, 360)).into_drawing_area();
        root.fill(&WHITE).map_err(draw_error)?;
        let mut chart = ChartBuilder::on(&root)
            .caption(title, ("sans-serif", 18))
            .margin(12)
            .x_label_area_size(36)
            .y_label_area_size(56)
            .build_cartesian_2d(x_min..x_max, y_min..y_max)
            .map_err(draw_error)?;
        chart
            .configure_mesh()
            .x_desc(x_label)
            .y_desc(y_label)
            .draw()
            .map_err(draw_error)?;
        for (i, s) in series.iter().enumerate() {
            let color = COLORS[i % COLORS.len()];
            chart
                .draw_series(LineSeries::new(s.points.clone(), color.stroke_width(2)))
                .map_err(draw_error)?
                .label(s.name)
                .legend(move |(x, y)| {
                    PathElement::new(vec![(x, y), (x + 16, y)], color.stroke_width(2))
                });
            chart
                .draw_series(s.points.iter().map(|&p| Circle::new(p, 3, color.filled())))
                .map_err(draw_error)?;
        }
        chart
            .configure_series_labels()
            .background_style(WHITE.mix(0.8))
            .border_style(BLACK)
            .draw()
            .map_err(draw_error)?;
        root.present().map_err(draw_error)?;
    }
    Ok(svg)
}

fn bounds(values: impl Iterator<Item = f64>) -> (f64, f64) {
    let (lo, hi) = values.fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), v| {
        (lo.min(v), hi.max(v))
    });
    if !lo.is_finite() || !hi.is_finite() {
        return (0.0, 1.0);
    }
    if (hi - lo).abs() < 1e-9 {
        return (lo - 0.5, hi + 0.5);
    }
    let pad = (hi - lo) * 0.05;
    (lo - pad, hi + pad)
}

fn draw_error<E: std::fmt::Debug>(err: E) -> anyhow::Error {
    anyhow::anyhow!("drawing a chart: {err:?}")
}

/// Escape text for HTML.
pub fn escape(text: &str) -> String {
    text.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

/// A file the page links to, beside it: what it is, and its relative path.
pub struct Link {
    pub what: String,
    pub href: String,
}

/// A page with a headline table, the files beside it, and the charts, each
/// with a caption.
pub fn html(
    title: &str,
    headline: &[(String, String)],
    links: &[Link],
    charts: &[(String, String)],
) -> String {
    let rows: String = headline
        .iter()
        .map(|(k, v)| format!("<tr><th>{}</th><td>{}</td></tr>", escape(k), escape(v)))
        .collect();
    let links: String = if links.is_empty() {
        String::new()
    } else {
        let items: String = links
            .iter()
            .map(|link| {
                format!(
                    "<li><a href=\"{}\">{}</a></li>",
                    escape(&link.href),
                    escape(&link.what)
                )
            })
            .collect();
        format!("<h2>Files</h2><ul>{items}</ul>")
    };
    let figures: String = charts
        .iter()
        .map(|(svg, caption)| {
            format!(
                "<figure>{svg}<figcaption>{}</figcaption></figure>",
                escape(caption)
            )
        })
        .collect();
    format!(
        "<!doctype html><html><head><meta charset=\"utf-8\"><title>{t}</title>\
         <style>body{{font-family:sans-serif;max-width:720px;margin:2em auto}}\
         th{{text-align:left;padding-right:1em}}figure{{margin:1.5em 0}}</style></head>\
         <body><h1>{t}</h1><table>{rows}</table>{links}{figures}</body></html>",
        t = escape(title)
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn charts_are_svg_with_their_labels() {
        let svg = line_chart(
            "labels",
            "round",
            "items",
            &[Series {
                name: "by machine",
                points: vec![(1.0, 0.0), (2.0, 40.0)],
            }],
        )
        .expect("chart");
        assert!(svg.starts_with("<svg"), "{}", &svg[..40.min(svg.len())]);
        assert!(svg.contains("by machine"));
        let page = html(
            "<demo>",
            &[("a".into(), "<b>".into())],
            &[Link {
                what: "labels & more".into(),
                href: "labels.csv".into(),
            }],
            &[(svg, "x < y".into())],
        );
        assert!(
            page.contains("&lt;demo&gt;")
                && page.contains("&lt;b&gt;")
                && page.contains("x &lt; y")
                && page.contains("<a href=\"labels.csv\">labels &amp; more</a>")
        );
    }
}

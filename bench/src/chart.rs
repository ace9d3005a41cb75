//! A horizontal bar chart as a small self-contained SVG.

use std::fmt::Write;

/// One bar: label and value.
pub struct Bar {
    pub label: String,
    pub value: f64,
}

/// Renders `bars` with a title and a unit for the axis.
pub fn bars(title: &str, unit: &str, bars: &[Bar]) -> String {
    let width = 720.0;
    let label_w = 260.0;
    let bar_h = 22.0;
    let gap = 8.0;
    let top = 40.0;
    let height = top + bars.len() as f64 * (bar_h + gap) + 30.0;
    let max = bars.iter().map(|b| b.value).fold(0.0_f64, f64::max).max(f64::MIN_POSITIVE);
    let scale = (width - label_w - 90.0) / max;
    let mut s = String::new();
    let _ = writeln!(
        s,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" font-family="sans-serif" font-size="13">"#
    );
    let _ = writeln!(s, r#"<rect width="100%" height="100%" fill="white"/>"#);
    let _ = writeln!(s, r#"<text x="10" y="24" font-size="15" font-weight="bold">{}</text>"#, escape(title));
    for (i, b) in bars.iter().enumerate() {
        let y = top + i as f64 * (bar_h + gap);
        let w = (b.value * scale).max(1.0);
        let _ = writeln!(
            s,
            r#"<text x="{}" y="{}" text-anchor="end">{}</text>"#,
            label_w - 8.0,
            y + bar_h * 0.7,
            escape(&b.label)
        );
        let _ = writeln!(s, r##"<rect x="{label_w}" y="{y}" width="{w:.1}" height="{bar_h}" fill="#4a7ab5"/>"##);
        let _ =
            writeln!(s, r#"<text x="{:.1}" y="{}">{:.2} {}</text>"#, label_w + w + 6.0, y + bar_h * 0.7, b.value, unit);
    }
    s.push_str("</svg>\n");
    s
}

fn escape(t: &str) -> String {
    t.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;")
}

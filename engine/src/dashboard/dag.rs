//! Pictures drawn on the server as SVG (no script, so they pass the CSP and print): a workflow's
//! DAG with each step's state, and a run's attempts on a time axis. Every text is escaped, and
//! each picture has a title and a description for screen readers.

use std::collections::HashMap;
use std::fmt::Write as _;

use super::views::AttemptView;
use crate::state::Millis;

/// A step as the DAG draws it.
pub(super) struct Node<'a> {
    pub id: &'a str,
    pub kind: &'a str,
    pub needs: &'a [String],
    /// Its state in a run; `None` on a workflow's page.
    pub state: Option<&'a str>,
    /// One of `on_failure`: drawn after the others.
    pub on_failure: bool,
}

const NODE_W: i64 = 176;
const NODE_H: i64 = 48;
const GAP_X: i64 = 56;
const GAP_Y: i64 = 18;
const PAD: i64 = 8;

pub(super) fn escape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

/// The column of each node: one after the furthest of its needs; failure handlers after all.
fn columns(nodes: &[Node]) -> Vec<usize> {
    let index: HashMap<&str, usize> = nodes.iter().enumerate().map(|(i, n)| (n.id, i)).collect();
    let mut column: Vec<Option<usize>> = vec![None; nodes.len()];
    fn visit(
        i: usize,
        nodes: &[Node],
        index: &HashMap<&str, usize>,
        column: &mut Vec<Option<usize>>,
        depth: usize,
    ) -> usize {
        if let Some(c) = column[i] {
            return c;
        }
        // Definitions are checked acyclic on load; the depth bound only guards a corrupt one.
        let c = if depth > nodes.len() {
            0
        } else {
            nodes[i]
                .needs
                .iter()
                .filter_map(|n| index.get(n.as_str()))
                .map(|&n| visit(n, nodes, index, column, depth + 1) + 1)
                .max()
                .unwrap_or(0)
        };
        column[i] = Some(c);
        c
    }
    for i in 0..nodes.len() {
        visit(i, nodes, &index, &mut column, 0);
    }
    let mut column: Vec<usize> = column.into_iter().map(Option::unwrap_or_default).collect();
    let last = nodes
        .iter()
        .zip(&column)
        .filter(|(n, _)| !n.on_failure)
        .map(|(_, c)| *c)
        .max()
        .unwrap_or(0);
    for (n, c) in nodes.iter().zip(column.iter_mut()) {
        if n.on_failure {
            *c = (*c).max(last + 1);
        }
    }
    column
}

/// The DAG of `nodes` as an SVG element.
pub(super) fn svg(nodes: &[Node], label: &str) -> String {
    let column = columns(nodes);
    let mut rows: HashMap<usize, i64> = HashMap::new();
    let mut at = Vec::with_capacity(nodes.len());
    for c in &column {
        let row = rows.entry(*c).or_insert(0);
        at.push((
            PAD + *c as i64 * (NODE_W + GAP_X),
            PAD + *row * (NODE_H + GAP_Y),
        ));
        *row += 1;
    }
    let width =
        PAD * 2 + (column.iter().max().map_or(0, |c| *c as i64 + 1)) * (NODE_W + GAP_X) - GAP_X;
    let height = PAD * 2 + rows.values().max().copied().unwrap_or(0) * (NODE_H + GAP_Y) - GAP_Y;
    let index: HashMap<&str, usize> = nodes.iter().enumerate().map(|(i, n)| (n.id, i)).collect();
    let description = nodes
        .iter()
        .map(|n| {
            let mut d = n.id.to_owned();
            if let Some(state) = n.state {
                let _ = write!(d, " ({state})");
            }
            if !n.needs.is_empty() {
                let _ = write!(d, " after {}", n.needs.join(", "));
            }
            d
        })
        .collect::<Vec<_>>()
        .join("; ");
    let mut out = String::new();
    let _ = write!(
        out,
        r#"<svg class="dag" viewBox="0 0 {w} {h}" width="{w}" height="{h}" role="img" aria-labelledby="dag-title dag-desc" xmlns="http://www.w3.org/2000/svg"><title id="dag-title">{label}</title><desc id="dag-desc">{desc}</desc><defs><marker id="arrow" viewBox="0 0 8 8" refX="8" refY="4" markerWidth="7" markerHeight="7" orient="auto"><path d="M0,0 L8,4 L0,8 z" class="arrowhead"/></marker></defs>"#,
        w = width.max(NODE_W + 2 * PAD),
        h = height.max(NODE_H + 2 * PAD),
        label = escape(label),
        desc = escape(&description),
    );
    for (i, node) in nodes.iter().enumerate() {
        for need in node.needs {
            let Some(&from) = index.get(need.as_str()) else {
                continue;
            };
            let (x1, y1) = (at[from].0 + NODE_W, at[from].1 + NODE_H / 2);
            let (x2, y2) = (at[i].0, at[i].1 + NODE_H / 2);
            let mid = (x1 + x2) / 2;
            let _ = write!(
                out,
                r#"<path class="edge" d="M{x1},{y1} C{mid},{y1} {mid},{y2} {x2},{y2}" marker-end="url(#arrow)"/>"#
            );
        }
    }
    for (node, (x, y)) in nodes.iter().zip(&at) {
        let state = node.state.unwrap_or("defined");
        let sub = match node.state {
            Some(s) => format!("{} · {s}", node.kind),
            None if node.on_failure => format!("{} · on failure", node.kind),
            None => node.kind.to_owned(),
        };
        let _ = write!(
            out,
            r#"<g class="node state-{state}"><title>{id}: {sub}</title><rect x="{x}" y="{y}" width="{NODE_W}" height="{NODE_H}" rx="6"/><text x="{tx}" y="{ty1}" class="node-id">{id_short}</text><text x="{tx}" y="{ty2}" class="node-sub">{sub_short}</text></g>"#,
            state = escape(state),
            id = escape(node.id),
            sub = escape(&sub),
            tx = x + 10,
            ty1 = y + 20,
            ty2 = y + 38,
            id_short = escape(&shorten(node.id, 22)),
            sub_short = escape(&shorten(&sub, 26)),
        );
    }
    out.push_str("</svg>");
    out
}

fn shorten(text: &str, at: usize) -> String {
    if text.chars().count() <= at {
        text.to_owned()
    } else {
        let mut s: String = text.chars().take(at - 1).collect();
        s.push('…');
        s
    }
}

/// The attempts on a time axis from `from` to `to` (ms), one row each.
pub(super) fn timeline(attempts: &[AttemptView], from: Millis, to: Millis) -> String {
    const LABEL_W: i64 = 180;
    const BAR_W: i64 = 640;
    const ROW_H: i64 = 22;
    let span = (to - from).max(1) as f64;
    let height = attempts.len() as i64 * ROW_H + 28;
    let width = LABEL_W + BAR_W + 20;
    let mut out = String::new();
    let _ = write!(
        out,
        r#"<svg class="timeline" viewBox="0 0 {width} {height}" width="{width}" height="{height}" role="img" aria-labelledby="timeline-title" xmlns="http://www.w3.org/2000/svg"><title id="timeline-title">Attempts from {start} to {end}: the table below lists them</title>"#,
        start = super::render::time(from),
        end = super::render::time(to),
    );
    for (row, a) in attempts.iter().enumerate() {
        let y = row as i64 * ROW_H + 4;
        let start = a.started_at.unwrap_or(from);
        let end = a.finished_at.unwrap_or(to);
        let x = LABEL_W + ((start - from) as f64 / span * BAR_W as f64) as i64;
        let w = (((end - start).max(0) as f64 / span * BAR_W as f64) as i64).max(2);
        let _ = write!(
            out,
            r#"<text x="0" y="{ty}" class="tl-label">{label}</text><rect x="{x}" y="{y}" width="{w}" height="16" rx="3" class="tl-bar state-{outcome}"><title>{label}: {outcome}, {took}</title></rect>"#,
            ty = y + 12,
            label = escape(&shorten(&format!("{} #{}", a.step_id, a.attempt), 26)),
            outcome = escape(&a.outcome),
            took = super::render::duration(a.took.unwrap_or(0)),
        );
    }
    let _ = write!(
        out,
        r#"<text x="{LABEL_W}" y="{y}" class="tl-axis">0</text><text x="{x}" y="{y}" class="tl-axis" text-anchor="end">{span}</text></svg>"#,
        y = height - 6,
        x = LABEL_W + BAR_W,
        span = super::render::duration(to - from),
    );
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_step_is_drawn_one_column_after_the_last_of_its_needs() {
        let needs_ab = vec!["a".to_owned(), "b".to_owned()];
        let needs_a = vec!["a".to_owned()];
        let nodes = [
            Node {
                id: "a",
                kind: "noop",
                needs: &[],
                state: None,
                on_failure: false,
            },
            Node {
                id: "b",
                kind: "noop",
                needs: &needs_a,
                state: None,
                on_failure: false,
            },
            Node {
                id: "c",
                kind: "noop",
                needs: &needs_ab,
                state: None,
                on_failure: false,
            },
            Node {
                id: "tell",
                kind: "notify",
                needs: &[],
                state: None,
                on_failure: true,
            },
        ];
        assert_eq!(columns(&nodes), vec![0, 1, 2, 3]);
        let svg = svg(&nodes, "<x>");
        assert!(svg.contains("&lt;x&gt;") && !svg.contains("<x>"), "{svg}");
        assert_eq!(svg.matches("class=\"edge\"").count(), 3);
    }
}

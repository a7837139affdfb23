//! `sieve items list|show|reopen`: a project's items a page at a time, one
//! item's history, a label reported as wrong.

use std::fmt::Write as _;

use sieve_shared::Settings;
use uuid::Uuid;

use super::args::ItemsCommand;
use super::render::print_json;
use crate::items::{self, ItemHistory, ItemPage, ListRequest, reopen};
use crate::{db, projects};

pub async fn items(settings: Settings, command: ItemsCommand) -> anyhow::Result<()> {
    match command {
        ItemsCommand::List {
            project,
            state,
            class,
            source,
            max_confidence,
            cursor,
            limit,
            json,
        } => {
            // Checked before connecting: a typo answers at once.
            let mut request = ListRequest {
                limit: items::DEFAULT_LIMIT,
                ..ListRequest::default()
            };
            for s in &state {
                request.filters.add_state(s)?;
            }
            for c in &class {
                request.filters.add_class(c);
            }
            for s in &source {
                request.filters.add_source(s)?;
            }
            if let Some(max) = &max_confidence {
                request.set_max_confidence(max)?;
            }
            if let Some(cursor) = &cursor {
                request.set_cursor(cursor)?;
            }
            if let Some(limit) = &limit {
                request.set_limit(limit)?;
            }
            let conn = db::connect(&settings.database).await?;
            let project = projects::get(&conn, &project).await?;
            let page = items::list(&conn, &project, &request).await?;
            if json {
                print_json(&page)?;
            } else {
                print!("{}", render_page(&page));
            }
        }
        ItemsCommand::Show { item, json } => {
            let item: Uuid = item
                .parse()
                .map_err(|_| anyhow::anyhow!("{item:?} is not an item id"))?;
            let conn = db::connect(&settings.database).await?;
            let history = items::show_any(&conn, item).await?;
            if json {
                print_json(&history)?;
            } else {
                print!("{}", render_history(&history));
            }
        }
        ItemsCommand::Reopen {
            item,
            reason,
            force,
            reporter,
        } => {
            let item: Uuid = item
                .parse()
                .map_err(|_| anyhow::anyhow!("{item:?} is not an item id"))?;
            let conn = db::connect(&settings.database).await?;
            let reporter = reopen::Reporter {
                name: &reporter,
                token: None,
            };
            let reopened = reopen::reopen(
                &conn,
                item,
                None,
                reporter,
                &reopen::Reopen { reason, force },
            )
            .await?;
            println!(
                "item {} is back in review (task {}, at the top of the queue); reported: {} label {:?}",
                reopened.item_id,
                reopened.task_id,
                reopened.reported_source,
                reopened.reported_class
            );
        }
    }
    Ok(())
}

fn render_page(page: &ItemPage) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "{:<36}  {:<13}  {:<14} {:<8} {:<14} {:>6}  key",
        "item", "state", "label", "by", "predicted", "conf"
    );
    for i in &page.items {
        let _ = writeln!(
            out,
            "{:<36}  {:<13}  {:<14} {:<8} {:<14} {:>6}  {}",
            i.item_id,
            i.state,
            i.label.as_deref().unwrap_or("-"),
            i.label_source.as_deref().unwrap_or("-"),
            i.predicted.as_deref().unwrap_or("-"),
            i.confidence.map_or("-".into(), |c| format!("{c:.3}")),
            i.key
        );
    }
    match page.next_cursor {
        Some(cursor) => {
            let _ = writeln!(
                out,
                "{} item(s); next page: --cursor {cursor}",
                page.items.len()
            );
        }
        None => {
            let _ = writeln!(out, "{} item(s); the last page", page.items.len());
        }
    }
    out
}

fn render_history(h: &ItemHistory) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "item {} of {}: {} ({}), from {}",
        h.item_id, h.project, h.state, h.key, h.source
    );
    if let Some(error) = &h.last_error {
        let _ = writeln!(out, "  last error: {error}");
    }
    match &h.label {
        Some(l) => {
            let _ = writeln!(
                out,
                "  label: {} ({}{})",
                l.class.as_deref().unwrap_or("?"),
                l.source,
                l.labeled_by
                    .as_deref()
                    .map_or_else(String::new, |by| format!(" by {by}"))
            );
        }
        None => {
            let _ = writeln!(out, "  no label");
        }
    }
    let _ = writeln!(out, "predictions:");
    for p in &h.predictions {
        let _ = writeln!(
            out,
            "  {} v{} {} {:.3} (disagreement {:.2}), votes {}, routed {}",
            p.created_at.to_rfc3339(),
            p.model_version.map_or("?".into(), |v| v.to_string()),
            p.predicted.as_deref().unwrap_or("?"),
            p.confidence,
            p.disagreement,
            p.member_votes,
            p.routed_to.as_deref().unwrap_or("-")
        );
    }
    let _ = writeln!(out, "labels:");
    for l in &h.labels {
        let who = match (&l.labeled_by, l.model_version) {
            (Some(by), _) => format!("by {by}"),
            (None, Some(v)) => format!("by model v{v}"),
            (None, None) => String::new(),
        };
        let _ = writeln!(
            out,
            "  {} {} {} {who}",
            l.created_at.to_rfc3339(),
            l.class.as_deref().unwrap_or("?"),
            l.source
        );
    }
    let _ = writeln!(out, "review tasks:");
    for t in &h.review_tasks {
        let report = match (&t.report_reason, &t.reported_by) {
            (Some(why), Some(by)) => format!(" — reported by {by}: {why}"),
            _ => String::new(),
        };
        let _ = writeln!(
            out,
            "  {} {} {} → {}{report}",
            t.created_at.to_rfc3339(),
            t.reason,
            t.state,
            t.outcome.as_deref().unwrap_or("open")
        );
    }
    out
}

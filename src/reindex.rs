//! `confab reindex`: rebuilds the search index from the store, with a progress bar on stderr. An
//! interrupted run resumes where it stopped (`--restart` starts over). With the embedded index,
//! stop `confab serve` first (one process at a time opens it); with Meilisearch it runs beside the
//! API processes and their indexers.

use std::io::Write;

use anyhow::Context;
use clap::Args;
use confab_api::indexer::{self, ReindexProgress};
use confab_runtime::config::Config;

#[derive(Args, Debug)]
pub struct ReindexArgs {
    /// Start over (clear the index) even when an earlier run was interrupted.
    #[arg(long)]
    pub restart: bool,
}

pub async fn run(args: ReindexArgs, config: Config) -> anyhow::Result<()> {
    let store = crate::open_store(&config, false).await?;
    let bus = crate::open_bus(&config).await?;
    let search = crate::open_search(&config)?.context(
        "the embedded search index is open in another process: stop `confab serve` first",
    )?;
    // Counting the chats first gives the bar its end.
    let mut total = 0u64;
    let mut after = None;
    loop {
        let page = store.chat_ids(after, 1_000).await?;
        total += page.len() as u64;
        match page.last() {
            Some(last) if page.len() == 1_000 => after = Some(*last),
            _ => break,
        }
    }
    let state = indexer::reindex(&*store, &*bus, &*search, args.restart, |p| {
        draw(p, total);
    })
    .await?;
    eprintln!();
    println!(
        "reindexed {} chats, {} messages; the indexers continue from event {}",
        state.chats, state.messages, state.bus_from
    );
    Ok(())
}

fn draw(progress: &ReindexProgress, total: u64) {
    const WIDTH: u64 = 30;
    let done = progress.chats.min(total.max(progress.chats));
    let filled = (done * WIDTH)
        .checked_div(total)
        .unwrap_or(WIDTH)
        .min(WIDTH);
    let percent = (done * 100).checked_div(total).unwrap_or(100);
    let rate = progress.messages as f64 / progress.elapsed.as_secs_f64().max(0.001);
    let mut stderr = std::io::stderr();
    let _ = write!(
        stderr,
        "\r[{}{}] {percent:>3}% {done}/{total} chats, {} messages, {rate:.0} messages/s ",
        "#".repeat(filled as usize),
        ".".repeat((WIDTH - filled) as usize),
        progress.messages,
    );
    let _ = stderr.flush();
}

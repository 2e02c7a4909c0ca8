//! The `loadtest` binary: parse the flags, run every level, print the summary table on stdout
//! and write the `--out` files. See the crate documentation of `loadtest` for the flow and the
//! README's "Load testing" section for typical command lines.

use anyhow::Context;
use clap::Parser;
use loadtest::cli::Args;
use loadtest::output::{self, table};

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let config = Args::parse().into_config()?;
    let percentiles = config.report.percentiles.clone();
    let report = loadtest::run(&config, |level| {
        print!("{}", table::level_block(&level.stats, &percentiles));
    })
    .await?;
    if report.levels.len() > 1 {
        print!("{}", table::sweep(&report));
    }
    if let Some(dir) = &config.report.out {
        output::write_dir(dir, &report).with_context(|| format!("writing {}", dir.display()))?;
        eprintln!("wrote {}", dir.display());
    }
    let completed: u64 = report.levels.iter().map(|l| l.stats.completed).sum();
    // A run where nothing succeeded measured nothing; say so through the exit status too.
    anyhow::ensure!(
        completed > 0,
        "no request completed (see the error kinds above)"
    );
    Ok(())
}

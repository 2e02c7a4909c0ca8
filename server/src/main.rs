//! The `server` binary.

fn main() -> anyhow::Result<()> {
    Ok(())
}

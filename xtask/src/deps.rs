//! Installs host packages (apt) and Rust targets. Owned by the image work.

use anyhow::Result;

pub fn install() -> Result<()> {
    anyhow::bail!("xtask deps: not written yet")
}

//! The official Python `kubernetes` client (installed by scripts/setup.sh into
//! ~/.cache/outpost/py) against `outpost up`.

use anyhow::ensure;
use outpost_tests::{python, Up};

#[test]
fn list_watch_create_patch() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    // Short, so the script sees an event expire.
    let up = Up::start_with(dir.path(), &["--event-ttl", "5"])?;
    let script = outpost_tests::crate_dir().join("py/client.py");
    let out = std::process::Command::new(python()?)
        .arg(&script)
        .env("KUBECONFIG", &up.kubeconfig)
        .output()?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    ensure!(
        out.status.success(),
        "python client failed:\n{stdout}\n{stderr}"
    );
    ensure!(stdout.contains("python client: ok"), "{stdout}");
    Ok(())
}

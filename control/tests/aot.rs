//! Ahead-of-time compilation: what the control plane's compiler makes for this machine's
//! architecture runs in a node's runtime; an artifact for another architecture, or bytes that
//! are no artifact, are refused with the reason, never loaded.

use outpost_wasm_runtime::{Command, Compiler, Exit, Runtime, Stop};

/// A WASI command that exits with code 7 through `proc_exit`.
const EXIT7: &str = r#"(module
  (import "wasi_snapshot_preview1" "proc_exit" (func $exit (param i32)))
  (memory (export "memory") 1)
  (func (export "_start") (call $exit (i32.const 7))))"#;

#[tokio::test]
async fn artifacts_run_on_their_architecture_only() -> anyhow::Result<()> {
    let compiler = Compiler::default();
    let rt = Runtime::new()?;
    let native = compiler.compile(std::env::consts::ARCH, EXIT7.as_bytes())?;
    let program = rt.load("sha256:exit7", &native)?;
    let exit = rt.run(&program, &Command::default(), &Stop::new()).await?;
    assert_eq!(exit, Exit::Code(7));

    let other = if std::env::consts::ARCH == "aarch64" {
        "x86_64"
    } else {
        "aarch64"
    };
    let foreign = compiler.compile(other, EXIT7.as_bytes())?;
    assert_ne!(foreign, native);
    let e = rt
        .load("sha256:foreign", &foreign)
        .expect_err("another architecture");
    assert!(e.to_string().contains("architecture"), "{e}");

    let e = rt
        .load("sha256:junk", b"\x7fELF junk")
        .expect_err("not an artifact");
    assert!(e.to_string().contains("compiled artifact"), "{e}");
    let e = compiler
        .compile("sparc", EXIT7.as_bytes())
        .expect_err("unknown arch");
    assert!(e.to_string().contains("sparc"), "{e}");
    let e = compiler
        .compile(other, b"\0asm\x01\0\0\0\xff")
        .expect_err("bad module");
    assert!(matches!(e, outpost_wasm_runtime::Error::Invalid(_)), "{e}");
    Ok(())
}

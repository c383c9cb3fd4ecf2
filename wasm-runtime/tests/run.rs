//! WASI preview 1 commands through the real wasmtime engine: output, exit codes, limits,
//! stopping, and modules that must be refused.

use std::time::{Duration, Instant};

use outpost_wasm_runtime::{Command, Error, Exit, Runtime, Stop};

const HELLO: &str = r#"(module
  (import "wasi_snapshot_preview1" "fd_write" (func $fd_write (param i32 i32 i32 i32) (result i32)))
  (memory (export "memory") 1)
  (data (i32.const 16) "hello from wasm\n")
  (func (export "_start")
    (i32.store (i32.const 0) (i32.const 16))
    (i32.store (i32.const 4) (i32.const 16))
    (drop (call $fd_write (i32.const 1) (i32.const 0) (i32.const 1) (i32.const 8)))))"#;

const EXIT3: &str = r#"(module
  (import "wasi_snapshot_preview1" "proc_exit" (func $exit (param i32)))
  (memory (export "memory") 1)
  (func (export "_start") (call $exit (i32.const 3))))"#;

const HOG: &str = r#"(module
  (memory (export "memory") 1)
  (func (export "_start")
    (loop $l (br_if $l (i32.ne (memory.grow (i32.const 16)) (i32.const -1))))))"#;

const SPIN: &str = r#"(module
  (memory (export "memory") 1)
  (func (export "_start") (loop $l (br $l))))"#;

fn cmd() -> Command {
    Command {
        args: vec!["app".into()],
        ..Default::default()
    }
}

async fn run(rt: &Runtime, wat: &str, c: &Command) -> Result<Exit, Error> {
    // The text itself is the cache key: two modules must never share one.
    let m = rt.module(wat, wat.as_bytes())?;
    rt.run(&m, c, &Stop::default()).await
}

#[tokio::test(flavor = "multi_thread")]
async fn hello_writes_stdout_and_exits_zero() -> anyhow::Result<()> {
    let rt = Runtime::new()?;
    let dir = tempfile::tempdir()?;
    let out = dir.path().join("0.log");
    let c = Command {
        log: Some(outpost_wasm_runtime::log::Log::open(&out, 1 << 20)?),
        ..cmd()
    };
    let exit = run(&rt, HELLO, &c).await?;
    assert_eq!(exit, Exit::Code(0));
    assert_eq!(exit.reason(), "Completed");
    let data = std::fs::read(&out)?;
    assert_eq!(outpost_wasm_runtime::log::text(&data), b"hello from wasm\n");
    let r = outpost_wasm_runtime::log::records(&data)
        .next()
        .expect("a record");
    assert_eq!((r.stream, r.full), ("stdout", true));
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn proc_exit_code_is_reported() -> anyhow::Result<()> {
    let rt = Runtime::new()?;
    let exit = run(&rt, EXIT3, &cmd()).await?;
    assert_eq!(exit, Exit::Code(3));
    assert_eq!((exit.code(), exit.reason()), (3, "Error"));
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn memory_limit_stops_the_hog() -> anyhow::Result<()> {
    let rt = Runtime::new()?;
    let c = Command {
        memory: Some(4 << 20),
        ..cmd()
    };
    let exit = run(&rt, HOG, &c).await?;
    assert_eq!(exit, Exit::OutOfMemory { limit: 4 << 20 });
    assert_eq!((exit.code(), exit.reason()), (137, "OOMKilled"));
    Ok(())
}

const COUNT: &str = r#"(module
  (memory (export "memory") 1)
  (func (export "_start") (local $i i32)
    (local.set $i (i32.const 100000000))
    (loop $l (local.set $i (i32.sub (local.get $i) (i32.const 1)))
      (br_if $l (local.get $i)))))"#;

#[tokio::test(flavor = "multi_thread")]
async fn cpu_limit_slows_a_busy_guest() -> anyhow::Result<()> {
    let rt = Runtime::new()?;
    let t = Instant::now();
    assert_eq!(run(&rt, COUNT, &cmd()).await?, Exit::Code(0));
    let free = t.elapsed();
    let c = Command {
        millicores: Some(100),
        ..cmd()
    };
    let t = Instant::now();
    assert_eq!(run(&rt, COUNT, &c).await?, Exit::Code(0));
    let limited = t.elapsed();
    // A tenth of a core should take about ten times as long; allow for a busy machine.
    assert!(
        limited > free * 3 && limited > Duration::from_millis(100),
        "unlimited {free:?}, limited to 100m {limited:?}"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn stop_ends_a_spinning_guest() -> anyhow::Result<()> {
    let rt = Runtime::new()?;
    let m = rt.module("spin", SPIN.as_bytes())?;
    let stop = Stop::new();
    let s = stop.clone();
    tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(200)).await;
        s.stop();
    });
    let t = Instant::now();
    let exit = rt.run(&m, &cmd(), &stop).await?;
    assert_eq!(exit, Exit::Stopped);
    assert!(t.elapsed() < Duration::from_secs(5));
    Ok(())
}

const SLEEP: &str = r#"(module
  (import "wasi_snapshot_preview1" "poll_oneoff" (func $poll (param i32 i32 i32 i32) (result i32)))
  (memory (export "memory") 1)
  (func (export "_start")
    ;; one clock subscription at 0: userdata 0, tag 0 (clock), id 1 (monotonic), 1 hour
    (i64.store (i32.const 16) (i64.const 1))
    (i64.store (i32.const 24) (i64.const 3600000000000))
    (drop (call $poll (i32.const 0) (i32.const 64) (i32.const 1) (i32.const 128)))))"#;

#[tokio::test(flavor = "multi_thread")]
async fn stop_ends_a_sleeping_guest_and_sleepers_hold_no_thread() -> anyhow::Result<()> {
    let rt = std::sync::Arc::new(Runtime::new()?);
    let m = rt.module("sleep", SLEEP.as_bytes())?;
    // More sleeping guests than the runtime has worker threads: all of them wait at once.
    let stops: Vec<_> = (0..64).map(|_| Stop::new()).collect();
    let mut runs = Vec::new();
    for s in &stops {
        let (rt, m, s) = (rt.clone(), m.clone(), s.clone());
        runs.push(tokio::spawn(async move { rt.run(&m, &cmd(), &s).await }));
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(
        runs.iter().all(|r| !r.is_finished()),
        "a sleeper ended early"
    );
    let t = Instant::now();
    for s in &stops {
        s.stop();
    }
    for r in runs {
        assert_eq!(r.await??, Exit::Stopped);
    }
    assert!(t.elapsed() < Duration::from_secs(2), "{:?}", t.elapsed());
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn bad_modules_are_refused_with_a_reason() -> anyhow::Result<()> {
    let rt = Runtime::new()?;
    match rt.module("junk", b"\0asm\x01\0\0\0garbage") {
        Err(Error::Invalid(why)) => assert!(!why.is_empty()),
        other => panic!("expected Invalid, got {other:?}"),
    }
    let odd = r#"(module (import "env" "launch_missiles" (func)) (func (export "_start")))"#;
    match run(&rt, odd, &cmd()).await {
        Err(Error::Unsupported(why)) => assert!(why.contains("launch_missiles"), "{why}"),
        other => panic!("expected Unsupported, got {other:?}"),
    }
    let lib = r#"(module (func (export "add") (param i32 i32) (result i32) local.get 0))"#;
    assert!(matches!(
        run(&rt, lib, &cmd()).await,
        Err(Error::NotCommand(_))
    ));
    // The runtime still runs good modules afterwards.
    assert_eq!(run(&rt, EXIT3, &cmd()).await?, Exit::Code(3));
    Ok(())
}

/// Runs a command in a fresh engine in this process (on its own, and as the child of the
/// test below).
#[tokio::test(flavor = "multi_thread")]
async fn an_engine_runs_a_command() -> anyhow::Result<()> {
    let rt = Runtime::new()?;
    assert_eq!(run(&rt, EXIT3, &cmd()).await?, Exit::Code(3));
    Ok(())
}

/// With 512 GiB of address space, as kernels with 39-bit addresses give a process (some ARM
/// boards), the engine still starts, with a smaller pool, and runs a command.
#[test]
fn the_engine_starts_in_a_39_bit_address_space() -> anyhow::Result<()> {
    let exe = std::env::current_exe()?;
    let out = std::process::Command::new("sh")
        .arg("-c")
        .arg("ulimit -v 536870912 && exec \"$0\" --exact an_engine_runs_a_command --nocapture")
        .arg(&exe)
        .output()?;
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "{said}");
    assert!(said.contains("1 passed"), "{said}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn usage_counts_a_guests_cpu_and_memory_while_it_runs() -> anyhow::Result<()> {
    let rt = std::sync::Arc::new(Runtime::new()?);
    let usage = std::sync::Arc::new(outpost_wasm_runtime::Usage::default());
    let c = Command {
        millicores: Some(500),
        usage: Some(usage.clone()),
        ..cmd()
    };
    let stop = Stop::new();
    let m = rt.module(SPIN, SPIN.as_bytes())?;
    let task = tokio::spawn({
        let (rt, stop) = (rt.clone(), stop.clone());
        async move { rt.run(&m, &c, &stop).await }
    });
    let t = Instant::now();
    tokio::time::sleep(Duration::from_millis(800)).await;
    let (cpu, held) = (usage.cpu(), usage.memory());
    let wall = t.elapsed();
    stop.stop();
    assert_eq!(task.await??, Exit::Stopped);
    // Half a core: about 400 ms of the 800, the rest asleep at its epoch deadlines.
    assert!(
        cpu > Duration::from_millis(150) && cpu < wall,
        "{cpu:?} of CPU in {wall:?}"
    );
    assert_eq!(held, 64 << 10, "one page of linear memory");
    assert_eq!(usage.memory(), 0, "a gone instance holds nothing");
    Ok(())
}

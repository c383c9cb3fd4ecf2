//! `wasi:http` components served by the real wasmtime engine: a request whose instance
//! cannot run answers 500 and leaves the server serving, and a stopped server drains and ends
//! cleanly. Uses `examples/out/http-hello.wasm` (`scripts/examples.sh`; the test command builds it).

use std::sync::Arc;
use std::time::{Duration, Instant};

use outpost_tests::http_get as get;
use outpost_wasm_runtime::log::{self, Log};
use outpost_wasm_runtime::{Command, Exit, Program, Runtime, Stop};

fn component() -> anyhow::Result<Vec<u8>> {
    // This package's directory at run time, so a binary built from another checkout works.
    let p = outpost_tests::crate_dir().join("../examples/out/http-hello.wasm");
    std::fs::read(&p).map_err(|e| anyhow::anyhow!("{}: {e} (run scripts/examples.sh)", p.display()))
}

fn port() -> anyhow::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

async fn serve(
    cmd: Command,
) -> anyhow::Result<(
    Arc<Stop>,
    tokio::task::JoinHandle<Result<Exit, outpost_wasm_runtime::Error>>,
)> {
    let rt = Arc::new(Runtime::new()?);
    let bytes = component()?;
    let program = rt.module("http-hello", &bytes)?;
    assert!(matches!(program, Program::Http(_)), "{program:?}");
    let stop = Stop::new();
    let s = stop.clone();
    let task = tokio::spawn(async move { rt.run(&program, &cmd, &s).await });
    Ok((stop, task))
}

#[tokio::test(flavor = "multi_thread")]
async fn a_failing_request_answers_500_and_the_server_goes_on() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let file = dir.path().join("0.log");
    let p = port()?;
    // 64 KiB cannot hold the guest's memory: every instance fails, none takes the server down.
    let cmd = Command {
        memory: Some(64 << 10),
        listen: Some(([127, 0, 0, 1], p).into()),
        log: Some(Log::open(&file, log::MAX)?),
        ..Command::default()
    };
    let (stop, task) = serve(cmd).await?;
    for _ in 0..2 {
        let (code, body) = tokio::task::spawn_blocking(move || get(p, "/")).await??;
        assert_eq!(code, 500, "{body}");
        assert!(body.contains("memory limit of 65536 bytes"), "{body}");
    }
    assert!(!task.is_finished());
    let logged = log::text(&std::fs::read(&file)?);
    assert!(String::from_utf8_lossy(&logged).contains("request failed: memory limit"));
    stop.stop();
    assert_eq!(task.await??, Exit::Code(0));
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn a_stopped_server_drains_and_frees_its_port() -> anyhow::Result<()> {
    let p = port()?;
    let cmd = Command {
        listen: Some(([127, 0, 0, 1], p).into()),
        grace: Duration::from_secs(5),
        ..Command::default()
    };
    let (stop, task) = serve(cmd).await?;
    let (code, body) = tokio::task::spawn_blocking(move || get(p, "/x")).await??;
    assert_eq!((code, body.as_str()), (200, "hello from Outpost at /x\n"));
    // An idle keep-alive connection does not hold the stop up.
    let idle = std::net::TcpStream::connect(("127.0.0.1", p))?;
    let t = Instant::now();
    stop.stop();
    assert_eq!(task.await??, Exit::Code(0));
    assert!(t.elapsed() < Duration::from_secs(2), "{:?}", t.elapsed());
    drop(idle);
    assert!(std::net::TcpStream::connect(("127.0.0.1", p)).is_err());
    Ok(())
}

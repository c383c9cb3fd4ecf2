//! Says it is up, then idles until stopped: a stand-in for a long-lived service, used by the
//! node benchmark to count start latency and memory per running pod.
//!
//! With `STATE_FILE` set (a file on a volume), it first appends a line there and says how
//! many starts the file has seen, so a pod on a persistent volume shows that its data
//! outlived the pods before it.
fn main() {
    if let Ok(path) = std::env::var("STATE_FILE") {
        use std::io::Write;
        let started = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .and_then(|mut f| f.write_all(b"started\n"))
            .and_then(|()| std::fs::read_to_string(&path));
        match started {
            Ok(all) => println!("starts: {}", all.lines().count()),
            Err(e) => {
                eprintln!("{path}: {e}");
                std::process::exit(1);
            }
        }
    }
    println!("up");
    loop {
        std::thread::sleep(std::time::Duration::from_secs(3600));
    }
}

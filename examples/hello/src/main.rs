//! Prints a greeting, its arguments and the environment it was given, each file named in
//! `SHOW_FILES` (comma-separated paths, for example on a mounted volume) and, with
//! `READ_STDIN` set, each line of its stdin (what `kubectl run -i` sends), then exits 0,
//! or with `EXIT_CODE` when that is set (only in the Job pod whose `JOB_COMPLETION_INDEX`
//! equals `EXIT_INDEX`, when that is set too).
fn main() {
    let who = std::env::var("GREETING_TARGET").unwrap_or_else(|_| "edge".into());
    println!("Hello, {who}! A Wasm pod on Outpost.");
    let args: Vec<String> = std::env::args().skip(1).collect();
    if !args.is_empty() {
        println!("args: {}", args.join(" "));
    }
    if let Ok(pod) = std::env::var("POD_NAME") {
        println!("pod: {pod}");
    }
    for path in std::env::var("SHOW_FILES").unwrap_or_default().split(',') {
        if path.is_empty() {
            continue;
        }
        match std::fs::read_to_string(path) {
            Ok(text) => println!("{path}: {text}"),
            Err(e) => println!("{path}: unreadable: {e}"),
        }
    }
    if std::env::var("READ_STDIN").is_ok() {
        for line in std::io::stdin().lines() {
            match line {
                Ok(l) => println!("read: {l}"),
                Err(e) => {
                    eprintln!("stdin: {e}");
                    break;
                }
            }
        }
        println!("end of input");
    }
    let env = |k: &str| std::env::var(k).ok();
    let here = env("EXIT_INDEX").is_none_or(|i| env("JOB_COMPLETION_INDEX") == Some(i));
    if let Some(code) = env("EXIT_CODE").and_then(|c| c.parse().ok()).filter(|_| here) {
        std::process::exit(code);
    }
}

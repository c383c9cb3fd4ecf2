//! Prints a greeting, its arguments and the environment it was given, then exits 0.
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
}

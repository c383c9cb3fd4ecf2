//! Says it is up, then idles until stopped: a stand-in for a long-lived service, used by the
//! node benchmark to count start latency and memory per running pod.
fn main() {
    println!("up");
    loop {
        std::thread::sleep(std::time::Duration::from_secs(3600));
    }
}

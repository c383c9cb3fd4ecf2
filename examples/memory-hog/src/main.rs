//! Takes memory a MiB at a time (touching every page) and says how much it holds, until it
//! is stopped; the first argument caps it in MiB (unbounded without one).
fn main() {
    let cap: usize = std::env::args()
        .nth(1)
        .and_then(|a| a.parse().ok())
        .unwrap_or(usize::MAX);
    let mut held: Vec<Vec<u8>> = Vec::new();
    while held.len() < cap {
        held.push(vec![0x5a; 1 << 20]);
        if held.len() % 8 == 0 {
            println!("holding {} MiB", held.len());
        }
    }
    println!("holding {} MiB; done", held.len());
}

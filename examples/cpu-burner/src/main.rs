//! Spins on arithmetic and reports its pace every second, forever (or for the number of
//! seconds given as the first argument). Under a CPU limit the pace drops.
use std::time::{Duration, Instant};

fn main() {
    let secs: Option<u64> = std::env::args().nth(1).and_then(|a| a.parse().ok());
    let start = Instant::now();
    let mut x: u64 = 1;
    let mut rounds: u64 = 0;
    let mut mark = Instant::now();
    loop {
        for i in 0..1_000_000u64 {
            x = x.wrapping_mul(6364136223846793005).wrapping_add(i);
        }
        rounds += 1;
        if mark.elapsed() >= Duration::from_secs(1) {
            println!("{rounds} million rounds/s (x={})", x % 1000);
            rounds = 0;
            mark = Instant::now();
        }
        if secs.is_some_and(|s| start.elapsed() >= Duration::from_secs(s)) {
            return;
        }
    }
}

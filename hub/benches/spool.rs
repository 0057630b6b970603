//! Benchmark: how fast the InfluxDB disk spool takes fsynced group commits and gives them
//! back, in appends and points per second.
//!
//! `cargo bench -p hub --bench spool`

use std::sync::Arc;
use std::time::Instant;

use hub::store::spool::{Spool, SpoolOptions};

fn main() {
    let temp = match tempfile::Builder::new()
        .prefix("hub-spool-bench-")
        .tempdir()
    {
        Ok(temp) => temp,
        Err(err) => {
            eprintln!("cannot make a temporary directory: {err}");
            std::process::exit(1);
        }
    };
    let dir = temp.path().join("spool");
    let (mut spool, _) = match Spool::open(&dir, SpoolOptions::for_capacity(1 << 30)) {
        Ok(opened) => opened,
        Err(err) => {
            eprintln!("cannot open a spool in {}: {err}", dir.display());
            std::process::exit(1);
        }
    };
    // A typical group commit: 16 devices' batches, 256 points of line protocol.
    let line = b"telemetry,device=dev-000123,metric=temperature value=21.5 1764060000000\n";
    let lines: Vec<u8> = line
        .iter()
        .copied()
        .cycle()
        .take(line.len() * 256)
        .collect();
    let marks: Vec<(Arc<str>, u64)> = (0..16)
        .map(|i| (Arc::from(format!("dev-{i}").as_str()), 1))
        .collect();
    let n = 500;
    let started = Instant::now();
    for _ in 0..n {
        if let Err(err) = spool.append(&marks, 256, &lines) {
            eprintln!("append failed: {err}");
            std::process::exit(1);
        }
    }
    let secs = started.elapsed().as_secs_f64();
    println!(
        "spool: {n} fsynced appends of {} bytes (256 points) in {secs:.2} s: {:.0} appends/s, {:.0} points/s, {:.1} MB/s",
        lines.len(),
        n as f64 / secs,
        n as f64 * 256.0 / secs,
        spool.bytes() as f64 / secs / 1e6
    );
    let started = Instant::now();
    let mut records = 0u64;
    loop {
        match spool.read_chunk(2 << 20) {
            Ok(Some(chunk)) => {
                let count = chunk.records.len() as u64;
                records += count;
                if let Err(err) = spool.advance(chunk.end) {
                    eprintln!("advance failed: {err}");
                    std::process::exit(1);
                }
            }
            Ok(None) => break,
            Err(err) => {
                eprintln!("read failed: {err}");
                std::process::exit(1);
            }
        }
    }
    println!(
        "spool: drained {records} records in {:.2} s",
        started.elapsed().as_secs_f64()
    );
    drop(temp);
}

//! A fixed-rate HTTP/1.1 load: latency at a set request rate, not under saturation.
//!
//! `cargo run --release --example fixed_rate -- ADDR RATE SECONDS CONNECTIONS [KEYS_FILE]`
//! sends `GET /` to ADDR (`127.0.0.1:port`) at RATE requests a second in all, spread evenly over
//! CONNECTIONS kept-alive connections, for SECONDS, each with `X-License-Key` taken in turn from
//! KEYS_FILE (one key a line) when it is given. One thread runs every connection (an event
//! loop, as wrk2's), so the load generator takes little of the machine from what it measures.
//!
//! A request's latency is counted from when it was due, not from when it was sent (as wrk2
//! does): a connection held up by a slow answer sends its next requests late, and their wait
//! counts, so a stall is not hidden by the requests it kept from being sent (coordinated
//! omission). The timer wakes a request at most ~1 ms after it is due (tokio's timer, as wrk2's
//! event loop), which every target measured pays alike. Prints one line:
//! `requests non_2xx rate p50_us p90_us p99_us p999_us max_us`.
//!
//! Loopback only, bounded by SECONDS. An answer must carry `Content-Length` (no chunking), or
//! have no body (1xx, 204, 304); one that does neither, or a connection that closes, counts as
//! not 2xx and the connection is made again.

use std::time::Duration;

use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::TcpStream;
use tokio::time::Instant;

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if args.len() < 5 {
        eprintln!("usage: fixed_rate ADDR RATE SECONDS CONNECTIONS [KEYS_FILE]");
        std::process::exit(2);
    }
    let addr = args[1].clone();
    let rate: f64 = args[2].parse().expect("RATE is a number");
    let seconds: f64 = args[3].parse().expect("SECONDS is a number");
    let conns: usize = args[4].parse().expect("CONNECTIONS is a number");
    assert!(
        rate > 0.0 && seconds > 0.0 && conns > 0,
        "RATE, SECONDS and CONNECTIONS > 0"
    );
    let keys: Vec<String> = args.get(5).map_or_else(Vec::new, |path| {
        std::fs::read_to_string(path)
            .expect("KEYS_FILE")
            .lines()
            .filter(|l| !l.is_empty())
            .map(String::from)
            .collect()
    });
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a runtime");
    let (latencies, non_2xx, elapsed) = runtime.block_on(async move {
        // every connection's requests are `conns` periods apart, the connections staggered by one
        let period = Duration::from_secs_f64(conns as f64 / rate);
        let count = (rate * seconds) as usize / conns;
        let start = Instant::now() + Duration::from_millis(200);
        let keys = std::sync::Arc::new(keys);
        let tasks: Vec<_> = (0..conns)
            .map(|c| {
                let (addr, keys) = (addr.clone(), keys.clone());
                let first = start + Duration::from_secs_f64(c as f64 / rate);
                tokio::spawn(async move { connection(&addr, &keys, c, first, period, count).await })
            })
            .collect();
        let (mut latencies, mut non_2xx) = (Vec::new(), 0);
        for t in tasks {
            let (l, bad) = t.await.expect("a connection's task");
            latencies.extend(l);
            non_2xx += bad;
        }
        (latencies, non_2xx, start.elapsed().as_secs_f64())
    });
    let mut latencies = latencies;
    if latencies.is_empty() {
        eprintln!("fixed_rate: no request was due (RATE x SECONDS < CONNECTIONS)");
        std::process::exit(2);
    }
    latencies.sort_unstable();
    let at = |q: f64| {
        let i = ((latencies.len() as f64 * q).ceil() as usize).clamp(1, latencies.len());
        latencies[i - 1]
    };
    println!(
        "{} {} {:.0} {} {} {} {} {}",
        latencies.len(),
        non_2xx,
        latencies.len() as f64 / elapsed,
        at(0.50),
        at(0.90),
        at(0.99),
        at(0.999),
        latencies.last().copied().unwrap_or(0)
    );
}

/// One connection's requests: the latency of each in µs (from when it was due), and how many
/// were not answered with a 2xx status (a broken answer among them: the connection is then made
/// again).
async fn connection(
    addr: &str,
    keys: &[String],
    c: usize,
    first: Instant,
    period: Duration,
    count: usize,
) -> (Vec<u32>, usize) {
    let mut conn = None;
    let mut latencies = Vec::with_capacity(count);
    let mut non_2xx = 0;
    let mut request = Vec::with_capacity(256);
    for i in 0..count {
        let due = first + period * i as u32;
        tokio::time::sleep_until(due).await;
        request.clear();
        request.extend_from_slice(b"GET / HTTP/1.1\r\nHost: localhost\r\n");
        if !keys.is_empty() {
            request.extend_from_slice(b"X-License-Key: ");
            request.extend_from_slice(keys[(i * 7919 + c) % keys.len()].as_bytes());
            request.extend_from_slice(b"\r\n");
        }
        request.extend_from_slice(b"\r\n");
        let status = match exchange(&mut conn, addr, &request).await {
            Ok(status) => status,
            Err(_) => {
                conn = None; // made again for the next request
                0
            }
        };
        latencies.push(due.elapsed().as_micros().min(u32::MAX as u128) as u32);
        if !(200..300).contains(&status) {
            non_2xx += 1;
        }
    }
    (latencies, non_2xx)
}

type Conn = (BufReader<OwnedReadHalf>, OwnedWriteHalf);

/// Sends one request on the connection (made first if there is none) and reads its answer
/// whole: its status.
async fn exchange(conn: &mut Option<Conn>, addr: &str, request: &[u8]) -> std::io::Result<u16> {
    if conn.is_none() {
        let stream = TcpStream::connect(addr).await?;
        stream.set_nodelay(true)?;
        let (reader, writer) = stream.into_split();
        *conn = Some((BufReader::new(reader), writer));
    }
    let (reader, writer) = conn.as_mut().expect("made above");
    writer.write_all(request).await?;
    let broken =
        |what: &str| std::io::Error::new(std::io::ErrorKind::InvalidData, what.to_string());
    // the status line, the headers (for Content-Length), the body
    let mut line = String::new();
    if reader.read_line(&mut line).await? == 0 {
        return Err(broken("closed"));
    }
    let status: u16 = line
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| broken("no status"))?;
    let mut length = None;
    loop {
        line.clear();
        if reader.read_line(&mut line).await? == 0 {
            return Err(broken("closed in the head"));
        }
        if line.trim_end_matches(['\r', '\n']).is_empty() {
            break;
        }
        if let Some((name, value)) = line.split_once(':') {
            if name.eq_ignore_ascii_case("content-length") {
                length = value.trim().parse::<u64>().ok();
            }
        }
    }
    let length = match (length, status) {
        (Some(n), _) => n,
        (None, 100..=199 | 204 | 304) => 0,
        (None, _) => return Err(broken("no Content-Length")),
    };
    let copied = tokio::io::copy(&mut reader.take(length), &mut tokio::io::sink()).await?;
    if copied < length {
        return Err(broken("closed in the body"));
    }
    Ok(status)
}

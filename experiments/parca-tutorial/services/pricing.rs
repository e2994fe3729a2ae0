// pricing: a quote service in Rust (release build: no frame pointers). GET /quote prices a basket
// (price_basket: the CPU it spends) in the currency of the day, which it asks an upstream rates
// service for on every request (fetch_rates: a connection and a read that waits for the answer).
// The upstream answers slowly: the service is slow while its CPU is idle, which only an off-CPU
// profile shows.
//
//     pricing PORT UPSTREAM_PORT
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::thread;

#[inline(never)]
fn price_basket(seed: u64) -> u64 {
    // Compound discounts over a basket of 100,000 lines.
    let mut total = 0.0f64;
    for line in 0..100_000u64 {
        let price = ((seed ^ line).wrapping_mul(2654435761) % 10_000) as f64 / 100.0;
        let mut discounted = price;
        for tier in 1..4 {
            discounted *= 1.0 - 0.01 * tier as f64;
        }
        total += discounted.sqrt() * discounted.ln_1p();
    }
    total as u64
}

#[inline(never)]
fn fetch_rates(upstream: &str) -> u64 {
    let mut conn = match TcpStream::connect(upstream) {
        Ok(conn) => conn,
        Err(_) => return 100,
    };
    if conn.write_all(b"EUR\n").is_err() {
        return 100;
    }
    let mut answer = String::new();
    let _ = conn.read_to_string(&mut answer);
    answer.trim().parse().unwrap_or(100)
}

fn serve(stream: TcpStream, upstream: String) {
    let mut reader = BufReader::new(stream.try_clone().expect("clone"));
    let mut writer = stream;
    let mut seed = 0u64;
    loop {
        let mut request_line = String::new();
        match reader.read_line(&mut request_line) {
            Ok(0) | Err(_) => return,
            Ok(_) => {}
        }
        loop {
            let mut header = String::new();
            match reader.read_line(&mut header) {
                Ok(0) | Err(_) => return,
                Ok(_) if header == "\r\n" => break,
                Ok(_) => {}
            }
        }
        seed += 1;
        let body = if request_line.starts_with("GET /quote") {
            let total = price_basket(seed);
            let rate = fetch_rates(&upstream);
            format!("quote {} at rate {}\n", total * rate / 100, rate)
        } else {
            "not found\n".to_string()
        };
        let reply = format!("HTTP/1.1 200 OK\r\nContent-Length: {}\r\n\r\n{}", body.len(), body);
        if writer.write_all(reply.as_bytes()).is_err() {
            return;
        }
    }
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let listener = TcpListener::bind(format!("127.0.0.1:{}", args[1])).expect("pricing: listen");
    let upstream = format!("127.0.0.1:{}", args[2]);
    for stream in listener.incoming().flatten() {
        let upstream = upstream.clone();
        thread::spawn(move || serve(stream, upstream));
    }
}

//! Real traffic for the scenarios: servers on named threads in the server namespace, bounded in
//! connections and time.
use std::{
    io::{self, Read as _, Write as _},
    net::{SocketAddr, TcpListener, TcpStream},
    sync::mpsc,
    thread::JoinHandle,
    time::{Duration, Instant},
};

use crate::Lab;

/// The thread name (comm) of every lab server.
pub const SERVER_COMM: &str = "lab-server";
/// How long any one socket operation of the lab may block.
pub const IO_LIMIT: Duration = Duration::from_secs(60);

/// Listens on `addr` in the server namespace, accepts `count` connections one after another and
/// hands each to `handle`; returns once the socket listens. The thread yields the peers' addresses.
pub fn serve(
    lab: &Lab,
    addr: SocketAddr,
    count: usize,
    handle: fn(TcpStream) -> io::Result<()>,
) -> JoinHandle<Vec<SocketAddr>> {
    let (listening_tx, listening_rx) = mpsc::channel();
    let server = lab.server(SERVER_COMM, move || {
        let listener = TcpListener::bind(addr).unwrap_or_else(|e| panic!("bind {addr}: {e}"));
        listener
            .set_nonblocking(true)
            .expect("nonblocking listener");
        listening_tx.send(()).expect("the test waits");
        let deadline = Instant::now() + IO_LIMIT;
        let mut peers = Vec::new();
        while peers.len() < count {
            match listener.accept() {
                Ok((stream, peer)) => {
                    stream.set_nonblocking(false).expect("blocking stream");
                    limit_io(&stream);
                    handle(stream).unwrap_or_else(|e| panic!("serving {peer}: {e}"));
                    peers.push(peer);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    assert!(
                        Instant::now() < deadline,
                        "accepted {peers:?} of {count} in {IO_LIMIT:?}"
                    );
                    std::thread::sleep(Duration::from_millis(5));
                }
                Err(e) => panic!("accept on {addr}: {e}"),
            }
        }
        peers
    });
    listening_rx
        .recv_timeout(Duration::from_secs(10))
        .expect("the server thread did not start listening");
    server
}

/// Reads until EOF, writes it all back, closes.
pub fn echo(mut stream: TcpStream) -> io::Result<()> {
    let mut data = Vec::new();
    stream.read_to_end(&mut data)?;
    stream.write_all(&data)
}

/// Reads until EOF and answers with the number of bytes read (8 bytes, big-endian), closes.
pub fn sink(mut stream: TcpStream) -> io::Result<()> {
    let mut buf = vec![0u8; 64 * 1024];
    let mut total = 0u64;
    loop {
        match stream.read(&mut buf)? {
            0 => break,
            n => total += n as u64,
        }
    }
    stream.write_all(&total.to_be_bytes())
}

/// Sends `message`, half-closes, and returns what the server sent back until EOF.
pub fn exchange(mut stream: TcpStream, message: &[u8]) -> io::Result<Vec<u8>> {
    limit_io(&stream);
    stream.write_all(message)?;
    stream.shutdown(std::net::Shutdown::Write)?;
    let mut reply = Vec::new();
    stream.read_to_end(&mut reply)?;
    Ok(reply)
}

pub fn limit_io(stream: &TcpStream) {
    stream
        .set_read_timeout(Some(IO_LIMIT))
        .expect("read timeout");
    stream
        .set_write_timeout(Some(IO_LIMIT))
        .expect("write timeout");
}

//! Free TCP ports on loopback.

/// A port that was free a moment ago (bind to 0, read, release).
pub fn free_port() -> std::io::Result<u16> {
    let l = std::net::TcpListener::bind("127.0.0.1:0")?;
    Ok(l.local_addr()?.port())
}

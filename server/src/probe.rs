//! `server probe`: one HTTP GET to a route of a server on this host, exit status 0 when it
//! answers 200. The container image's health check, which has no curl to run.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

use anyhow::{bail, Context};
use clap::Args;

#[derive(Debug, Args)]
pub struct ProbeArgs {
    /// Port of the server on 127.0.0.1
    #[arg(long, env = "GRAFT_PORT", default_value_t = 8080)]
    port: u16,
    /// Route to ask: /health (ready to serve) or /live (the process answers)
    #[arg(long, default_value = "/health")]
    path: String,
    /// Seconds to wait for the answer
    #[arg(long, default_value_t = 5)]
    timeout: u64,
}

pub fn run(args: &ProbeArgs) -> anyhow::Result<()> {
    if !args.path.starts_with('/') || args.path.contains(char::is_whitespace) {
        bail!("--path must be a route like /health, got `{}`", args.path);
    }
    let addr = SocketAddr::from(([127, 0, 0, 1], args.port));
    let timeout = Duration::from_secs(args.timeout.max(1));
    let mut stream = TcpStream::connect_timeout(&addr, timeout)
        .with_context(|| format!("nothing answers on {addr}"))?;
    stream.set_read_timeout(Some(timeout))?;
    stream.set_write_timeout(Some(timeout))?;
    let request = format!(
        "GET {} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n",
        args.path
    );
    stream.write_all(request.as_bytes())?;
    // The status line is all a probe needs.
    let mut head = [0u8; 64];
    let n = stream.read(&mut head)?;
    let status_line = String::from_utf8_lossy(&head[..n]);
    let status = status_line.split_whitespace().nth(1).unwrap_or("none");
    match status {
        "200" => Ok(()),
        other => bail!("{} answered {other}", args.path),
    }
}

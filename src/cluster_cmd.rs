//! `chatsim cluster`: a local cluster of processes on loopback (one chat service, G gateway
//! nodes linked to it), so the tiered server can be driven over real sockets without a
//! process per terminal. It starts each node as `chatsim serve --role ...`, waits for each
//! to print its address, prints the endpoints, and stops every node on Ctrl-C. Nodes read
//! their standard input from the cluster and stop when it closes, so they never outlive it.

use anyhow::{bail, Context, Result};
use std::io::{BufRead, BufReader};
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

#[derive(clap::Args)]
pub struct ClusterArgs {
    /// Gateway nodes to start (named gw-1 .. gw-G).
    #[arg(long, default_value_t = 2, value_parser = clap::value_parser!(u16).range(1..=64))]
    pub gateways: u16,
    /// Loopback address every node listens on.
    #[arg(long, default_value = "127.0.0.1")]
    pub host: IpAddr,
    /// First port: the chat service's client port; its link port is the next one and
    /// the gateways take the ports after that. 0: every node picks a free port.
    #[arg(long, default_value_t = 8080)]
    pub base_port: u16,
    /// The chat service's store and secret (tokens: `chatsim token --data-dir DIR`).
    #[arg(long, default_value = "chatsim-data")]
    pub data_dir: PathBuf,
    /// Keep the chat service's store in memory (nothing survives a restart).
    #[arg(long)]
    pub memory: bool,
    /// The chat service's fsync mode (`group` or `each`, as for `serve`).
    #[arg(long, default_value = "group", value_parser = ["group", "each"])]
    pub fsync: String,
}

/// One node of the cluster.
struct Node {
    name: String,
    child: Child,
    addr: SocketAddr,
}

/// Longest a node may take to print its address.
const START_TIMEOUT: Duration = Duration::from_secs(30);

pub fn cluster(a: ClusterArgs) -> Result<()> {
    if !a.host.is_loopback() {
        bail!(
            "--host {}: the cluster runs on loopback only (127.0.0.0/8 or ::1)",
            a.host
        );
    }
    let port = |i: u16| -> Result<u16> {
        if a.base_port == 0 {
            return Ok(0);
        }
        a.base_port
            .checked_add(i)
            .context("--base-port too high for this many gateways")
    };
    let exe = std::env::current_exe().context("finding the chatsim binary")?;
    let mut nodes: Vec<Node> = Vec::new();
    let started = (|| -> Result<()> {
        let listen = SocketAddr::new(a.host, port(0)?);
        let link = SocketAddr::new(a.host, port(1)?);
        let mut cmd = Command::new(&exe);
        cmd.args(["serve", "--role", "chat", "--stop-with-stdin"])
            .arg("--listen")
            .arg(listen.to_string())
            .arg("--link-listen")
            .arg(link.to_string())
            .arg("--data-dir")
            .arg(&a.data_dir)
            .args(["--fsync", &a.fsync]);
        if a.memory {
            cmd.arg("--memory");
        }
        let (chat, lines) = start(cmd, "chat")?;
        let chat_http = chat.addr;
        let link_addr = lines
            .iter()
            .find_map(|l| l.trim().strip_prefix("links: gateway nodes link to "))
            .context("the chat service did not print its link address")?
            .trim()
            .parse::<SocketAddr>()
            .context("the chat service's link address")?;
        nodes.push(chat);
        let secret = a.data_dir.join("secret");
        for g in 1..=a.gateways {
            let name = format!("gw-{g}");
            let listen = SocketAddr::new(a.host, port(1 + g)?);
            let mut cmd = Command::new(&exe);
            cmd.args(["serve", "--role", "gateway", "--stop-with-stdin"])
                .args(["--gateway", &name])
                .arg("--listen")
                .arg(listen.to_string())
                .arg("--chat")
                .arg(link_addr.to_string())
                .arg("--chat-http")
                .arg(chat_http.to_string())
                .arg("--secret-file")
                .arg(&secret);
            let (node, _) = start(cmd, &name)?;
            nodes.push(node);
        }
        println!(
            "chatsim cluster: 1 chat service and {} gateway node{} on {} (Ctrl-C stops them all)",
            a.gateways,
            if a.gateways == 1 { "" } else { "s" },
            a.host
        );
        for n in &nodes {
            let extra = if n.name == "chat" {
                format!(
                    "  link {link_addr}  store {}",
                    if a.memory {
                        "in memory".to_string()
                    } else {
                        a.data_dir.display().to_string()
                    }
                )
            } else {
                String::new()
            };
            println!(
                "  {:<6} pid {:<7} ws://{}/ws  http://{}/metrics{extra}",
                n.name,
                n.child.id(),
                n.addr,
                n.addr
            );
        }
        println!(
            "  tokens: chatsim token --user alice --device phone --secret-file {}",
            secret.display()
        );
        println!(
            "  clients connect to any gateway (media requests pass through to the chat service)"
        );
        Ok(())
    })();
    if let Err(e) = started {
        stop_all(&mut nodes);
        return Err(e);
    }
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the tokio runtime")?;
    rt.block_on(async {
        let mut tick = tokio::time::interval(Duration::from_millis(500));
        loop {
            tokio::select! {
                _ = crate::shutdown_signal() => break,
                _ = tick.tick() => {
                    for n in &mut nodes {
                        if let Ok(Some(status)) = n.child.try_wait() {
                            if n.addr.port() != 0 {
                                eprintln!("chatsim cluster: {} (pid {}) exited: {status}", n.name, n.child.id());
                                n.addr.set_port(0); // reported once
                            }
                        }
                    }
                }
            }
        }
    });
    eprintln!("chatsim cluster: stopping {} nodes", nodes.len());
    stop_all(&mut nodes);
    Ok(())
}

/// Starts one node and waits (bounded) until it prints its address; returns the node and
/// the lines it printed up to its banner's end.
fn start(mut cmd: Command, name: &str) -> Result<(Node, Vec<String>)> {
    let mut child = cmd
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .with_context(|| format!("starting {name}"))?;
    let stdout = child.stdout.take().context("node stdout")?;
    let (tx, rx) = mpsc::channel::<String>();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            // After the banner nobody listens; keep draining so the node never blocks.
            let _ = tx.send(line);
        }
    });
    let deadline = Instant::now() + START_TIMEOUT;
    let mut lines = Vec::new();
    let mut addr = None;
    while Instant::now() < deadline {
        match rx.recv_timeout(Duration::from_millis(200)) {
            Ok(line) => {
                if let Some(a) = line.strip_prefix("chatsim serve: listening on ") {
                    addr = Some(a.trim().parse::<SocketAddr>().context("node address")?);
                }
                // The banner's last line we need: the chat service's link address, a
                // gateway's WebSocket line.
                let done = if name == "chat" {
                    line.trim_start().starts_with("links:")
                } else {
                    line.trim_start().starts_with("WebSocket")
                };
                lines.push(line);
                if addr.is_some() && done {
                    break;
                }
            }
            Err(mpsc::RecvTimeoutError::Timeout) => {
                if let Ok(Some(status)) = child.try_wait() {
                    bail!("{name} exited before it was ready ({status}); its errors are above");
                }
            }
            Err(mpsc::RecvTimeoutError::Disconnected) => {
                let status = child.wait().ok();
                bail!(
                    "{name} exited before it was ready ({}); its errors are above",
                    status.map_or("no status".into(), |s| s.to_string())
                );
            }
        }
    }
    let Some(addr) = addr else {
        let _ = child.kill();
        let _ = child.wait();
        bail!(
            "{name} printed no address within {} s",
            START_TIMEOUT.as_secs()
        );
    };
    Ok((
        Node {
            name: name.to_string(),
            child,
            addr,
        },
        lines,
    ))
}

/// Closes every node's standard input (each shuts down gracefully: a gateway closes its
/// clients with 1012), waits up to 10 s in all, then kills what is left.
fn stop_all(nodes: &mut [Node]) {
    for n in nodes.iter_mut().rev() {
        drop(n.child.stdin.take());
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    for n in nodes.iter_mut().rev() {
        while Instant::now() < deadline {
            if let Ok(Some(_)) = n.child.try_wait() {
                break;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = n.child.kill();
        let _ = n.child.wait();
    }
}

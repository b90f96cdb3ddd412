//! Fake cloud metadata services on a namespace's loopback, and the DMI
//! fixtures that make `vpcgate` believe it runs on that cloud. They play
//! AWS (IMDSv2: a read without the token gets 401), GCP (no
//! `Metadata-Flavor: Google`, 403) and Azure (no `Metadata: true` or no
//! `api-version`, 400), and record every request, so a test can tell that
//! nothing was asked. Tests point `vpcgate` at these with `--dmi-dir` and
//! `--metadata-endpoint`, so none can reach a real metadata service.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::thread::{self, JoinHandle};
use std::time::Duration;

use crate::Netns;

/// The MAC the fakes give the instance's VPC-side interface.
pub const METADATA_VPC_MAC: &str = "02:00:00:00:64:0a";
const AWS_TOKEN: &str = "AQAEAFakeToken==";
const AWS_INSTANCE: &str = "i-0123456789abcdef0";

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Cloud {
    Aws,
    Gcp,
    Azure,
}

impl Cloud {
    pub const ALL: [Cloud; 3] = [Cloud::Aws, Cloud::Gcp, Cloud::Azure];

    /// The provider's id in doctor's output.
    pub fn subject(self) -> &'static str {
        match self {
            Cloud::Aws => "aws",
            Cloud::Gcp => "gcp",
            Cloud::Azure => "azure",
        }
    }

    /// The provider's name in vpcgate's messages.
    pub fn name(self) -> &'static str {
        match self {
            Cloud::Aws => "AWS",
            Cloud::Gcp => "GCP",
            Cloud::Azure => "Azure",
        }
    }

    /// A DMI directory under `dir` as each provider's VMs show it.
    pub fn dmi(self, dir: &Path) -> PathBuf {
        let files: &[(&str, &str)] = match self {
            Cloud::Aws => &[
                ("sys_vendor", "Amazon EC2"),
                ("product_name", "t4g.nano"),
                ("bios_vendor", "Amazon EC2"),
            ],
            Cloud::Gcp => &[
                ("sys_vendor", "Google"),
                ("product_name", "Google Compute Engine"),
                ("bios_vendor", "Google"),
            ],
            Cloud::Azure => &[
                ("sys_vendor", "Microsoft Corporation"),
                ("product_name", "Virtual Machine"),
                ("chassis_asset_tag", "7783-7084-3265-9085-8269-3286-77"),
            ],
        };
        write_dmi(&dir.join(format!("dmi-{}", self.subject())), files)
    }
}

/// A DMI directory under `dir` as a plain QEMU/KVM machine shows it: no
/// cloud.
pub fn plain_dmi(dir: &Path) -> PathBuf {
    write_dmi(
        &dir.join("dmi-qemu"),
        &[
            ("sys_vendor", "QEMU"),
            ("product_name", "Standard PC (Q35 + ICH9, 2009)"),
            ("bios_vendor", "SeaBIOS"),
        ],
    )
}

fn write_dmi(dir: &Path, files: &[(&str, &str)]) -> PathBuf {
    std::fs::create_dir_all(dir).expect("mkdir");
    for (name, value) in files {
        std::fs::write(dir.join(name), format!("{value}\n")).expect("write");
    }
    dir.to_path_buf()
}

/// One request as the fake saw it.
#[derive(Debug, Clone)]
pub struct Seen {
    pub method: String,
    pub path: String,
    /// Whether it carried what the provider demands (token or header).
    pub authorized: bool,
}

/// What a fake says; `public_ipv4: None` is the provider's way of saying
/// the instance has no public address (AWS and GCP: 404; Azure: empty).
#[derive(Clone)]
struct Script {
    cloud: Cloud,
    public_ipv4: Option<String>,
}

/// A metadata service on 127.0.0.1 inside a namespace, in its own thread
/// (`setns` moves only that thread). One with no cloud accepts connections
/// and never answers.
pub struct FakeMetadata {
    pub port: u16,
    seen: Arc<Mutex<Vec<Seen>>>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl FakeMetadata {
    /// A fake of `cloud` (one that hangs for `None`) whose instance has no
    /// public address.
    pub fn start(ns: &Netns, cloud: Option<Cloud>) -> FakeMetadata {
        FakeMetadata::spawn(
            ns,
            cloud.map(|cloud| Script {
                cloud,
                public_ipv4: None,
            }),
        )
    }

    /// A fake of `cloud` that answers `answer`, verbatim, when asked for
    /// the instance's public IPv4 address.
    pub fn with_public_ipv4(ns: &Netns, cloud: Cloud, answer: &str) -> FakeMetadata {
        FakeMetadata::spawn(
            ns,
            Some(Script {
                cloud,
                public_ipv4: Some(answer.to_string()),
            }),
        )
    }

    fn spawn(ns: &Netns, script: Option<Script>) -> FakeMetadata {
        let (tx, rx) = mpsc::channel();
        let seen = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let ns = ns.clone();
        let (seen2, stop2) = (seen.clone(), stop.clone());
        let thread = thread::spawn(move || {
            ns.enter_current_thread().expect("setns");
            let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
            listener.set_nonblocking(true).expect("nonblocking");
            tx.send(listener.local_addr().expect("addr").port())
                .expect("send port");
            let mut held = Vec::new();
            while !stop2.load(Ordering::Relaxed) {
                match listener.accept() {
                    Ok((conn, _)) => match &script {
                        Some(script) => serve(conn, script, &seen2),
                        None => held.push(conn),
                    },
                    Err(_) => thread::sleep(Duration::from_millis(10)),
                }
            }
        });
        let port = rx
            .recv_timeout(Duration::from_secs(5))
            .expect("fake metadata server starts");
        FakeMetadata {
            port,
            seen,
            stop,
            thread: Some(thread),
        }
    }

    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// Every request so far; a request is recorded before it is answered.
    pub fn seen(&self) -> Vec<Seen> {
        self.seen.lock().map(|s| s.clone()).unwrap_or_default()
    }
}

impl Drop for FakeMetadata {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn respond(conn: &mut TcpStream, status: &str, headers: &[(&str, &str)], body: &str) {
    let mut text = format!(
        "HTTP/1.1 {status}\r\nContent-Length: {}\r\nConnection: close\r\n",
        body.len()
    );
    for (name, value) in headers {
        text.push_str(&format!("{name}: {value}\r\n"));
    }
    text.push_str("\r\n");
    text.push_str(body);
    let _ = conn.write_all(text.as_bytes());
}

fn serve(mut conn: TcpStream, script: &Script, seen: &Mutex<Vec<Seen>>) {
    let _ = conn.set_nonblocking(false);
    let _ = conn.set_read_timeout(Some(Duration::from_secs(2)));
    let mut raw = Vec::new();
    let mut buf = [0u8; 2048];
    while !raw.windows(4).any(|w| w == b"\r\n\r\n") {
        match conn.read(&mut buf) {
            Ok(0) | Err(_) => return,
            Ok(n) => raw.extend_from_slice(&buf[..n]),
        }
    }
    let head = String::from_utf8_lossy(&raw).into_owned();
    let mut lines = head.split("\r\n");
    let mut first = lines.next().unwrap_or("").split(' ');
    let method = first.next().unwrap_or("").to_string();
    let path = first.next().unwrap_or("").to_string();
    let header = |name: &str| {
        head.split("\r\n").skip(1).find_map(|l| {
            let (n, v) = l.split_once(':')?;
            n.trim()
                .eq_ignore_ascii_case(name)
                .then(|| v.trim().to_string())
        })
    };
    let cloud = script.cloud;
    let authorized = match cloud {
        Cloud::Aws if method == "PUT" => header("X-aws-ec2-metadata-token-ttl-seconds")
            .and_then(|v| v.parse::<u32>().ok())
            .is_some_and(|ttl| (1..=21600).contains(&ttl)),
        Cloud::Aws => header("X-aws-ec2-metadata-token").as_deref() == Some(AWS_TOKEN),
        Cloud::Gcp => header("Metadata-Flavor").as_deref() == Some("Google"),
        Cloud::Azure => header("Metadata").as_deref() == Some("true"),
    };
    if let Ok(mut s) = seen.lock() {
        s.push(Seen {
            method: method.clone(),
            path: path.clone(),
            authorized,
        });
    }
    let public = script.public_ipv4.as_deref();
    match cloud {
        Cloud::Aws => {
            if !authorized {
                return respond(&mut conn, "401 Unauthorized", &[], "");
            }
            let mac_path = format!(
                "/latest/meta-data/network/interfaces/macs/{METADATA_VPC_MAC}/interface-id"
            );
            let body = match (method.as_str(), path.as_str()) {
                ("PUT", "/latest/api/token") => AWS_TOKEN,
                ("GET", "/latest/meta-data/instance-id") => AWS_INSTANCE,
                ("GET", "/latest/meta-data/placement/region") => "eu-west-1",
                ("GET", "/latest/meta-data/mac") => METADATA_VPC_MAC,
                ("GET", p) if p == mac_path => "eni-0a1b2c3d4e5f60718",
                ("GET", "/latest/meta-data/public-ipv4") => match public {
                    Some(ip) => ip,
                    None => return respond(&mut conn, "404 Not Found", &[], ""),
                },
                _ => return respond(&mut conn, "404 Not Found", &[], ""),
            };
            respond(&mut conn, "200 OK", &[], body)
        }
        Cloud::Gcp => {
            let flavor = [("Metadata-Flavor", "Google")];
            if !authorized {
                return respond(
                    &mut conn,
                    "403 Forbidden",
                    &flavor,
                    "Missing Metadata-Flavor:Google header.",
                );
            }
            let body = match path.as_str() {
                "/computeMetadata/v1/instance/name" => "gw-1",
                "/computeMetadata/v1/instance/zone" => "projects/123456789012/zones/us-central1-a",
                "/computeMetadata/v1/project/project-id" => "proj-x",
                "/computeMetadata/v1/instance/network-interfaces/0/access-configs/0/external-ip" => {
                    match public {
                        Some(ip) => ip,
                        None => return respond(&mut conn, "404 Not Found", &flavor, ""),
                    }
                }
                _ => return respond(&mut conn, "404 Not Found", &flavor, ""),
            };
            respond(&mut conn, "200 OK", &flavor, body)
        }
        Cloud::Azure => {
            if !authorized {
                return respond(
                    &mut conn,
                    "400 Bad Request",
                    &[],
                    r#"{"error":"Bad request. Required metadata header not specified"}"#,
                );
            }
            let (route, query) = path.split_once('?').unwrap_or((path.as_str(), ""));
            let params: Vec<&str> = query.split('&').collect();
            if !params.iter().any(|p| p.starts_with("api-version=")) {
                return respond(
                    &mut conn,
                    "400 Bad Request",
                    &[],
                    r#"{"error":"Bad request. api-version was not specified"}"#,
                );
            }
            match route {
                "/metadata/instance" => azure_instance(&mut conn),
                "/metadata/instance/network/interface/0/ipv4/ipAddress/0/publicIpAddress" => {
                    // Without format=text a leaf comes as JSON, in quotes.
                    let text = public.unwrap_or("");
                    if params.contains(&"format=text") {
                        respond(&mut conn, "200 OK", &[("Content-Type", "text/plain")], text)
                    } else {
                        let json = serde_json::Value::from(text).to_string();
                        let json_type = [("Content-Type", "application/json")];
                        respond(&mut conn, "200 OK", &json_type, &json)
                    }
                }
                _ => respond(&mut conn, "404 Not Found", &[], r#"{"error":"Not found"}"#),
            }
        }
    }
}

fn azure_instance(conn: &mut TcpStream) {
    let mac = METADATA_VPC_MAC.replace(':', "").to_ascii_uppercase();
    let body = serde_json::json!({
        "compute": {
            "name": "gw-vm", "resourceGroupName": "net-rg",
            "subscriptionId": "8d10da13-8125-4ba9-a717-bf7490507b3d",
            "location": "westeurope", "vmSize": "Standard_B1ls"
        },
        "network": {"interface": [
            {"ipv4": {"ipAddress": [{"privateIpAddress": "198.18.64.10", "publicIpAddress": ""}],
                      "subnet": [{"address": "198.18.64.0", "prefix": "20"}]},
             "ipv6": {"ipAddress": []}, "macAddress": "000D3AFFEE01"},
            {"ipv4": {"ipAddress": [{"privateIpAddress": "198.18.64.10", "publicIpAddress": ""}],
                      "subnet": [{"address": "198.18.64.0", "prefix": "20"}]},
             "ipv6": {"ipAddress": []}, "macAddress": mac}
        ]}
    });
    respond(
        conn,
        "200 OK",
        &[("Content-Type", "application/json")],
        &body.to_string(),
    )
}

/// Sends one raw request to the fake from inside the namespace.
pub fn raw_request(ns: &Netns, port: u16, request: &str) -> String {
    let ns = ns.clone();
    let request = request.to_string();
    thread::spawn(move || {
        ns.enter_current_thread().expect("setns");
        let mut conn = TcpStream::connect(("127.0.0.1", port)).expect("connect");
        conn.set_read_timeout(Some(Duration::from_secs(5)))
            .expect("timeout");
        conn.write_all(request.as_bytes()).expect("write");
        let mut out = String::new();
        let _ = conn.read_to_string(&mut out);
        out
    })
    .join()
    .expect("client thread")
}

//! `vpcgate peer add` on a gateway with no public endpoint set: on an AWS,
//! GCP or Azure VM (a fixture DMI directory) it reads the VM's public IPv4
//! address from the harness's fake metadata service on the namespace's
//! loopback, says so on stderr, saves it with the listen port and puts it
//! in the client config; an address clients cannot reach is refused and no
//! peer is added; off-cloud nothing is asked and the endpoint must be set
//! as before. Every run names the DMI directory and a loopback endpoint, so
//! no test can reach a real metadata service.

use std::path::Path;
use std::process::Output;
use std::time::{Duration, Instant};

use serde_json::Value;
use vpcgate_e2e::{
    gen_keypair, plain_dmi, require_root, vpcgate_bin, Cloud, FakeMetadata, Netns, VpcgatedConfig,
    WgDev,
};

/// Not 51820, so the test shows the port comes from the daemon.
const PORT: u16 = 51833;
/// A documentation address (RFC 5737), which vpcgate takes as public on
/// purpose: see `unreachable_kind` in ctl/src/doctor/cloud.rs.
const PUBLIC_IP: &str = "203.0.113.7";
const ENDPOINT: &str = "203.0.113.7:51833";
/// The end of vpcgated's refusal when no public endpoint is set.
const ASK_FOR_ENDPOINT: &str = "vpcgate set --public-endpoint HOST:PORT";

struct Gw {
    ns: Netns,
    dev: WgDev,
    cfg: VpcgatedConfig,
}

impl Gw {
    fn start(tag: &str) -> Gw {
        let ns = Netns::new(tag).expect("namespace");
        let mut cfg = VpcgatedConfig::new(PORT, "100.64.0.1/24");
        cfg.state_dir = Some(ns.dir().join("state"));
        let dev = WgDev::vpcgated(&ns, tag, &cfg).expect("vpcgated starts");
        Gw { ns, dev, cfg }
    }

    fn restart(&mut self) {
        self.dev
            .process()
            .terminate(Duration::from_secs(10))
            .expect("stops");
        self.dev = WgDev::vpcgated(&self.ns, "er", &self.cfg).expect("restarts");
    }

    /// Runs the CLI, killed after 60 s (`timeout` then exits 124): a
    /// `peer add` that hangs on a silent metadata service fails instead of
    /// hanging the suite.
    fn vpcgate(&self, args: &[&str]) -> Output {
        let bin = vpcgate_bin().expect("vpcgate binary");
        let bin = bin.to_string_lossy().into_owned();
        let socket = self.dev.control_socket().expect("control socket");
        let socket = socket.to_string_lossy().into_owned();
        let mut argv = vec!["timeout", "60", bin.as_str(), "--socket", socket.as_str()];
        argv.extend_from_slice(args);
        self.ns.exec_raw(&argv).expect("run vpcgate")
    }

    /// `vpcgate peer add NAME EXTRA…` as on a machine with this DMI and
    /// metadata service.
    fn peer_add(&self, name: &str, dmi: &Path, metadata: &str, extra: &[&str]) -> Output {
        let dmi = dmi.to_string_lossy().into_owned();
        let mut args = vec![
            "peer",
            "add",
            name,
            "--dmi-dir",
            &dmi,
            "--metadata-endpoint",
            metadata,
        ];
        args.extend_from_slice(extra);
        self.vpcgate(&args)
    }

    fn ok(&self, args: &[&str]) -> String {
        let out = self.vpcgate(args);
        assert!(out.status.success(), "vpcgate {args:?}: {out:?}");
        String::from_utf8(out.stdout).expect("UTF-8")
    }

    fn status(&self) -> Value {
        serde_json::from_str(&self.ok(&["status", "--json"])).expect("status JSON")
    }

    fn peer_names(&self) -> Vec<String> {
        self.status()["peers"]
            .as_array()
            .expect("peers")
            .iter()
            .filter_map(|p| p["name"].as_str().map(str::to_string))
            .collect()
    }
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[test]
fn peer_add_takes_the_public_address_from_each_cloud() {
    require_root();
    for (cloud, tag) in [(Cloud::Aws, "ea"), (Cloud::Gcp, "eg"), (Cloud::Azure, "ez")] {
        let mut gw = Gw::start(tag);
        assert_eq!(gw.status()["public_endpoint"], Value::Null);
        let fake = FakeMetadata::with_public_ipv4(&gw.ns, cloud, PUBLIC_IP);
        let dmi = cloud.dmi(gw.ns.dir());

        let out = gw.peer_add("laptop", &dmi, &fake.url(), &[]);
        let err = stderr(&out);
        assert!(out.status.success(), "{cloud:?}: {out:?}");
        let said = format!(
            "vpcgate: using public endpoint {ENDPOINT} from the {} metadata service \
             (saved; change it with vpcgate set --public-endpoint)\n",
            cloud.name()
        );
        assert!(err.starts_with(&said), "{cloud:?}: {err}");
        let config = String::from_utf8(out.stdout).expect("UTF-8");
        assert!(
            config.starts_with("[Interface]\nPrivateKey = "),
            "stdout must be only the config:\n{config}"
        );
        assert!(
            config.contains(&format!("\nEndpoint = {ENDPOINT}\n")),
            "{cloud:?}: {config}"
        );
        let seen = fake.seen();
        assert!(!seen.is_empty(), "{cloud:?}: nothing asked the fake");
        assert!(
            seen.iter().all(|s| s.authorized),
            "{cloud:?}: a request lacked the provider's token or header: {seen:?}"
        );
        if cloud == Cloud::Aws {
            let asked: Vec<(&str, &str)> = seen
                .iter()
                .map(|s| (s.method.as_str(), s.path.as_str()))
                .collect();
            assert_eq!(
                asked,
                [
                    ("PUT", "/latest/api/token"),
                    ("GET", "/latest/meta-data/public-ipv4")
                ],
                "IMDSv2: the token, then the address"
            );
        }
        assert_eq!(gw.status()["public_endpoint"], ENDPOINT, "{cloud:?}");

        // Saved: the next peer uses it and nothing is asked again.
        let asked = fake.seen().len();
        let out = gw.peer_add("phone", &dmi, &fake.url(), &[]);
        assert!(out.status.success(), "{out:?}");
        assert!(!stderr(&out).contains("metadata"), "{}", stderr(&out));
        let config = String::from_utf8(out.stdout).expect("UTF-8");
        assert!(config.contains(&format!("\nEndpoint = {ENDPOINT}\n")));
        assert_eq!(fake.seen().len(), asked, "asked again: {:?}", fake.seen());

        gw.restart();
        assert_eq!(gw.status()["public_endpoint"], ENDPOINT, "after a restart");
        let config = gw.ok(&["peer", "config", "laptop"]);
        assert!(config.contains(&format!("\nEndpoint = {ENDPOINT}\n")));
    }
}

#[test]
fn an_answer_that_is_no_public_address_adds_no_peer() {
    require_root();
    let gw = Gw::start("en");
    let cases = [
        (
            Cloud::Aws,
            Some("10.0.8.5"),
            "it answered 10.0.8.5, a private address (RFC 1918)",
        ),
        (
            Cloud::Gcp,
            Some("100.64.3.4"),
            "it answered 100.64.3.4, a shared carrier-grade NAT address",
        ),
        (
            Cloud::Azure,
            Some("192.168.0.4"),
            "it answered 192.168.0.4, a private address",
        ),
        (Cloud::Aws, Some("169.254.1.1"), "a link-local address"),
        (Cloud::Gcp, Some("198.18.64.10"), "a benchmarking address"),
        (
            Cloud::Aws,
            Some("2001:db8::7"),
            "it answered \"2001:db8::7\", which is not an IPv4 address",
        ),
        (
            Cloud::Gcp,
            Some("<html>\x1b[31m"),
            "it answered \"<html>\\u{1b}[31m\", which is not an IPv4 address",
        ),
        (
            Cloud::Aws,
            None,
            "this instance has no public IPv4 address (HTTP 404)",
        ),
        (
            Cloud::Gcp,
            None,
            "this instance has no public IPv4 address (HTTP 404)",
        ),
        // Azure's answer for a Standard-SKU public IP, and for none.
        (Cloud::Azure, Some(""), "or a Standard-SKU one"),
        (Cloud::Azure, None, "or a Standard-SKU one"),
    ];
    for (cloud, answer, why) in cases {
        let fake = match answer {
            Some(answer) => FakeMetadata::with_public_ipv4(&gw.ns, cloud, answer),
            None => FakeMetadata::start(&gw.ns, Some(cloud)),
        };
        let dmi = cloud.dmi(gw.ns.dir());
        let out = gw.peer_add("laptop", &dmi, &fake.url(), &[]);
        let err = stderr(&out);
        assert!(!out.status.success(), "{cloud:?} {answer:?}: {out:?}");
        assert!(out.stdout.is_empty(), "{out:?}");
        let line = format!(
            "vpcgate: no public address from the {} metadata service at {}: ",
            cloud.name(),
            fake.url()
        );
        let first = err.lines().next().unwrap_or("");
        assert!(
            first.starts_with(&line) && first.contains(why),
            "{cloud:?} {answer:?}: want {why:?} in {err}"
        );
        assert!(err.contains(ASK_FOR_ENDPOINT), "{err}");
        assert!(
            !fake.seen().is_empty() && fake.seen().iter().all(|s| s.authorized),
            "{:?}",
            fake.seen()
        );
        assert_eq!(gw.status()["public_endpoint"], Value::Null, "{cloud:?}");
        assert!(gw.peer_names().is_empty(), "{:?}", gw.peer_names());
    }

    // A metadata service that refuses connections, and one that never
    // answers: the same refusal, and soon.
    let dmi = Cloud::Aws.dmi(gw.ns.dir());
    let hang = FakeMetadata::start(&gw.ns, None);
    for endpoint in ["http://127.0.0.1:1".to_string(), hang.url()] {
        let started = Instant::now();
        let out = gw.peer_add("laptop", &dmi, &endpoint, &[]);
        // vpcgate gives the metadata service 5 s in all (2 s a request) and
        // the daemon answers in milliseconds, so 30 s holds on a far slower
        // machine; without a limit `timeout` would end it at 60 s.
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "{endpoint}: {:?}",
            started.elapsed()
        );
        let err = stderr(&out);
        assert!(!out.status.success(), "{out:?}");
        assert!(
            err.starts_with("vpcgate: no public address from the AWS metadata service")
                && err.contains(ASK_FOR_ENDPOINT),
            "{endpoint}: {err}"
        );
    }
    assert!(gw.peer_names().is_empty());
}

#[test]
fn off_cloud_or_with_an_endpoint_set_nothing_is_asked() {
    require_root();
    let gw = Gw::start("eo");
    let fake = FakeMetadata::with_public_ipv4(&gw.ns, Cloud::Aws, PUBLIC_IP);
    let empty = gw.ns.dir().join("dmi-empty");
    std::fs::create_dir_all(&empty).expect("mkdir");
    for dmi in [plain_dmi(gw.ns.dir()), empty] {
        let out = gw.peer_add("laptop", &dmi, &fake.url(), &[]);
        let err = stderr(&out);
        assert!(!out.status.success(), "{out:?}");
        assert!(out.stdout.is_empty(), "{out:?}");
        // vpcgated's refusal, as before this feature, and nothing more.
        assert_eq!(err.lines().count(), 1, "{err}");
        assert!(err.contains(ASK_FOR_ENDPOINT), "{err}");
        assert!(!err.contains("metadata"), "{err}");
    }
    assert!(gw.peer_names().is_empty());

    // On a cloud, a peer with its own key gets no config, so needs no
    // endpoint: nothing is asked or saved.
    let dmi = Cloud::Aws.dmi(gw.ns.dir());
    let key = gen_keypair().expect("keypair");
    let out = gw.peer_add("server", &dmi, &fake.url(), &["--public-key", &key.public]);
    assert!(out.status.success(), "{out:?}");
    assert_eq!(gw.status()["public_endpoint"], Value::Null);
    // A taken name is refused for that alone, before anything is asked.
    let out = gw.peer_add("server", &dmi, &fake.url(), &[]);
    assert!(!out.status.success(), "{out:?}");
    assert!(stderr(&out).contains("already exists"), "{}", stderr(&out));
    assert!(!stderr(&out).contains("metadata"), "{}", stderr(&out));
    assert_eq!(gw.status()["public_endpoint"], Value::Null);

    // A set endpoint wins over the metadata service.
    gw.ok(&["set", "--public-endpoint", "gw.example.com:51820"]);
    let out = gw.peer_add("laptop", &dmi, &fake.url(), &[]);
    assert!(out.status.success(), "{out:?}");
    assert!(!stderr(&out).contains("metadata"), "{}", stderr(&out));
    let config = String::from_utf8(out.stdout).expect("UTF-8");
    assert!(
        config.contains("\nEndpoint = gw.example.com:51820\n"),
        "{config}"
    );
    assert_eq!(gw.status()["public_endpoint"], "gw.example.com:51820");

    assert!(
        fake.seen().is_empty(),
        "the metadata service was asked: {:?}",
        fake.seen()
    );
}
